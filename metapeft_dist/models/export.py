"""LoRA adapters in mlx-lm's format: ``adapters.safetensors`` (mlx-lm's parameter names,
``model.layers.<i>.<key>.lora_a`` / ``.lora_b``) and ``adapter_config.json``.

The config carries what ``mlx_lm.tuner.utils.load_adapters`` reads (``fine_tune_type``,
``num_layers``, ``lora_parameters`` with ``rank``, ``scale``, ``dropout``, ``keys``) and
the base model as ``model``, as ``mlx_lm lora`` writes it. So an exported directory is
an ``adapter_path`` for ``mlx_lm.load``, ``mlx_lm generate`` and ``mlx_lm fuse``, and,
given as ``-c adapter_config.json`` with ``--resume-adapter-file``, a starting point for
``mlx_lm lora`` training.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx

from metapeft_dist.models.lora import is_adapter

ADAPTERS_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"


def adapter_config(base_path: str, num_layers: int, rank: int, scale: float,
                   keys) -> dict:
    return {
        "fine_tune_type": "lora",
        "model": str(base_path),
        "num_layers": int(num_layers),
        "lora_parameters": {"rank": int(rank), "scale": float(scale), "dropout": 0.0,
                            "keys": list(keys)},
    }


def export_adapters(adapters: dict[str, mx.array], out_dir, base_path: str, num_layers: int,
                    rank: int, scale: float, keys) -> Path:
    """Write the adapter entries of ``adapters`` (other entries, such as frozen
    ``inputs.*``, are left out) and their config into ``out_dir``; return it."""
    weights = {n: v for n, v in adapters.items() if is_adapter(n)}
    if not weights:
        raise ValueError("export_adapters: no lora_a / lora_b entries to export")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / ADAPTERS_FILE), weights)
    config = adapter_config(base_path, num_layers, rank, scale, keys)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def load_exported(out_dir) -> tuple[dict[str, mx.array], dict]:
    """(adapters, config) as :func:`export_adapters` wrote them."""
    out = Path(out_dir)
    config = json.loads((out / CONFIG_FILE).read_text())
    return dict(mx.load(str(out / ADAPTERS_FILE))), config
