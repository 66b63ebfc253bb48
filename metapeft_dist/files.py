"""Writing a run's small files whole or not at all, and saying why a write failed."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    """``text`` as ``path``, whole or not at all: written beside it, fsynced, renamed over
    it; the temporary is removed when the write fails (a full disk)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def failure_reason(err: BaseException) -> str:
    """Why a write failed, in words: an OSError's own (``No space left on device``),
    else the error's message (mlx raises RuntimeError when a safetensors write fails)."""
    return err.strerror if isinstance(err, OSError) and err.strerror else str(err)
