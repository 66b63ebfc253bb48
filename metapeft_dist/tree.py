"""Parameter trees.

A model's parameters are a flat ``dict[str, mx.array]`` named ``layer.kind``
(``hidden0.kernel``, ``hidden0.lora_a``, ``head.b``), the same names mlx-lm gives adapter
weights. Meta-parameters group such dicts: ``{"params": {...}, "lr": {...}}``.
Both are MLX trees, so ``mlx.utils.tree_map`` and ``mx.grad`` work on them directly.
Nested trees flatten to ``group/name`` keys (names contain no ``/``).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import mlx.core as mx

Params = dict[str, mx.array]
Meta = dict[str, Params]

SEP = "/"


def tree_mean(trees: Iterable[Any]) -> Any:
    """Elementwise mean of trees of equal structure, summed in the order given."""
    trees = list(trees)
    if not trees:
        raise ValueError("tree_mean of no trees")
    from mlx.utils import tree_map

    total = trees[0]
    for t in trees[1:]:
        total = tree_map(lambda a, b: a + b, total, t)
    n = len(trees)
    return tree_map(lambda a: a / n, total)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts of arrays -> ``{"a/b/c": array}``. Leaves are anything but dicts."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if SEP in key:
            raise ValueError(f"tree key {key!r} contains {SEP!r}")
        name = f"{prefix}{SEP}{key}" if prefix else key
        if isinstance(value, dict):
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten`."""
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        *groups, leaf = name.split(SEP)
        node = tree
        for g in groups:
            node = node.setdefault(g, {})
        node[leaf] = value
    return tree


def select(params: Params, keep: Callable[[str], bool]) -> tuple[Params, Params]:
    """Split ``params`` by name into (kept, rest)."""
    kept = {k: v for k, v in params.items() if keep(k)}
    rest = {k: v for k, v in params.items() if not keep(k)}
    return kept, rest


def num_elements(tree: Mapping[str, Any]) -> int:
    return sum(int(v.size) for v in flatten(tree).values())
