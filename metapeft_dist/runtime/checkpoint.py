"""Checkpoints: meta-parameters, outer-optimizer state and frozen base in one
safetensors file, written atomically and checked on load.

Layout: tensors ``meta/<group>/<name>``, ``opt/<path>``, ``frozen/<name>`` and, when
meta-validation selects an init, ``best/<group>/<name>`` (so a resumed run knows the best
init so far without any other file); metadata ``format``, ``iteration``, ``sha256``
(over every tensor's name, dtype, shape and bytes, in name order), free-form ``info``
(JSON) and ``order`` (the tensors' names in their trees' order, which a load restores;
a file without it loads in name order). A write goes to a temporary file that is
fsynced and renamed over the target, so a crash leaves either the old file or the new
one, never a torn one; a file whose checksum does not match is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from metapeft_dist.files import failure_reason
from metapeft_dist.tree import Meta, Params, flatten, unflatten

FORMAT = "metapeft-checkpoint/1"
_NAME = re.compile(r"ckpt-(\d{8})\.safetensors$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, of another format, or corrupt."""


@dataclass
class Checkpoint:
    iteration: int
    meta: Meta
    optimizer_state: dict[str, Any]
    frozen: Params
    info: dict[str, Any]
    best: Meta | None = None
    path: str = ""


def _raw_bytes(array: mx.array) -> bytes:
    if array.dtype == mx.bfloat16:
        array = array.view(mx.uint16)
    return np.asarray(array).tobytes()


def checksum(arrays: dict[str, mx.array]) -> str:
    digest = hashlib.sha256()
    for name in sorted(arrays):
        a = arrays[name]
        digest.update(f"{name}|{a.dtype}|{tuple(a.shape)}|".encode())
        digest.update(_raw_bytes(a))
    return digest.hexdigest()


def save_checkpoint(path: str | Path, iteration: int, meta: Meta,
                    optimizer_state: dict[str, Any], frozen: Params,
                    info: dict[str, Any] | None = None, best: Meta | None = None) -> Path:
    path = Path(path)
    arrays: dict[str, mx.array] = {}
    trees = [("meta", meta), ("opt", optimizer_state), ("frozen", frozen)]
    if best is not None:
        trees.append(("best", best))
    for prefix, tree in trees:
        for name, value in flatten(tree, prefix).items():
            arrays[name] = value if isinstance(value, mx.array) else mx.array(value)
    mx.eval(arrays)
    # the trees' key order: safetensors keeps none, and a tree's order is the order of
    # sums over it (the global gradient norm), so a resumed run needs it for equal bits
    metadata = {"format": FORMAT, "iteration": str(iteration), "sha256": checksum(arrays),
                "info": json.dumps(info or {}, sort_keys=True),
                "order": json.dumps(list(arrays))}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.safetensors")
    try:
        mx.save_safetensors(str(tmp), arrays, metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # mlx raises RuntimeError when a write fails
        tmp.unlink(missing_ok=True)
        free = shutil.disk_usage(path.parent).free / 2**20
        raise CheckpointError(f"cannot write checkpoint {path}: {failure_reason(err)} "
                              f"({free:.1f} MiB free on its disk)") from None
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        arrays, metadata = mx.load(str(path), return_metadata=True)
    except Exception as err:  # mlx raises ValueError / RuntimeError on torn files
        raise CheckpointError(f"checkpoint {path} is unreadable: {err}") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint {path} has format {metadata.get('format')!r}, expected {FORMAT!r}")
    if checksum(arrays) != metadata.get("sha256"):
        raise CheckpointError(f"checkpoint {path} is corrupt: its checksum does not match")
    try:
        iteration = int(metadata["iteration"])
        info = json.loads(metadata.get("info", "{}"))
        # written without an order (before it was kept): the names' sorted order
        order = json.loads(metadata["order"]) if "order" in metadata else sorted(arrays)
        if not isinstance(order, list) or sorted(order) != sorted(arrays):
            raise ValueError("its order does not name its arrays")
    except (KeyError, ValueError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path} has bad metadata: {err}") from None
    tree = unflatten({name: arrays[name] for name in order})
    return Checkpoint(iteration, tree.get("meta", {}), tree.get("opt", {}),
                      tree.get("frozen", {}), info, tree.get("best"), str(path))


def newest_good_checkpoint(directory: str | Path,
                           warn=lambda message: None) -> Checkpoint | None:
    """The newest checkpoint in ``directory`` that loads and passes its checksum.

    Each unusable newer one is reported through ``warn`` with its name and the reason,
    and skipped. None when there is no usable checkpoint.
    """
    for _, path in reversed(list_checkpoints(directory)):
        try:
            return load_checkpoint(path)
        except CheckpointError as err:
            warn(f"skipping {path.name}: {err}")
    return None


def checkpoint_path(directory: str | Path, iteration: int) -> Path:
    return Path(directory) / f"ckpt-{iteration:08d}.safetensors"


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """(iteration, path) of every checkpoint in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir()
             if (m := _NAME.fullmatch(p.name))]
    return sorted(found)


def prune_checkpoints(directory: str | Path, keep: int, protect: set[int] = frozenset()) -> None:
    """Delete all but the newest ``keep`` checkpoints (never those in ``protect``)."""
    found = list_checkpoints(directory)
    for iteration, path in found[: max(len(found) - keep, 0)]:
        if iteration not in protect:
            path.unlink(missing_ok=True)
