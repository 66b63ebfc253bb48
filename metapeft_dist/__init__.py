"""metapeft: distributed meta-training of LoRA initializations with MLX and Ray."""

import time as _time

# When this process first imported the package: for the CLI, its start (all but the
# interpreter's own tens of milliseconds). A run's startup timing counts from it.
IMPORTED_AT = _time.time()

from metapeft_dist.blas import ensure_fast_blas as _ensure_fast_blas  # noqa: E402

# Before anything in the package (or a user) imports mlx.core: see blas.py.
_ensure_fast_blas()

__version__ = "0.1.0"
