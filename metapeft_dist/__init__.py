"""metapeft: distributed meta-training of LoRA initializations with MLX and Ray."""

from metapeft_dist.blas import ensure_fast_blas as _ensure_fast_blas

# Before anything in the package (or a user) imports mlx.core: see blas.py.
_ensure_fast_blas()

__version__ = "0.1.0"
