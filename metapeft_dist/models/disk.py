"""What the models compute once and keep on disk: under ``$METAPEFT_CACHE`` (default
``~/.cache/metapeft``), one folder per kind (``encoder`` and ``causal_lm`` corpus
states, converted ``models``), each file written atomically."""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx


def cache_dir(kind: str) -> Path:
    return Path(os.environ.get("METAPEFT_CACHE", "~/.cache/metapeft")).expanduser() / kind


def save_atomic(file: Path, arrays: dict[str, mx.array]) -> None:
    """Write a safetensors file atomically: a file under its final name is complete,
    whoever reads it (processes building the same cache at once each write their own
    partial file)."""
    file.parent.mkdir(parents=True, exist_ok=True)
    partial = file.with_suffix(f".{os.getpid()}.tmp.safetensors")
    mx.save_safetensors(str(partial), arrays)
    os.replace(partial, file)
