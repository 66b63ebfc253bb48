"""What the models compute once and keep on disk: under ``$METAPEFT_CACHE`` (default
``~/.cache/metapeft``), one folder per kind (``encoder`` and ``causal_lm`` corpus
states, converted ``models``), each file written atomically, and built by one process
at a time."""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from pathlib import Path
from typing import Iterator

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


@contextlib.contextmanager
def building(target: Path, what: str) -> Iterator[None]:
    """Hold ``target``'s build lock while the caller reads the cached ``target`` or, when
    it is missing, builds it: processes that need the same cache at once (a driver and
    its workers, jobs side by side) wait for the first to build it, then read its file,
    instead of each computing it again. ``what`` names the work in the one line a process
    prints when it waits. The lock is an flock on a file of its own under ``.locks`` beside
    the kind's folder (``$METAPEFT_CACHE/.locks/encoder/NAME.lock``), so a kind's folder
    holds its entries only; lock files stay (removing one would race its next user)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    locks = target.parent.parent / ".locks" / target.parent.name
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{target.name}.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"metapeft: waiting for another process building {what}", file=sys.stderr,
                  flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
