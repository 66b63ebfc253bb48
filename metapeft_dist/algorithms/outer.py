"""The outer (meta) optimizer: an mlx.optimizers optimizer with a learning-rate
schedule, global-norm gradient clipping, and the outer update as one compiled graph."""

from __future__ import annotations

from typing import Any, Callable

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_map


def make_schedule(spec, total_updates: int) -> float | Callable[[mx.array], mx.array]:
    """``spec`` is a :class:`metapeft_dist.config.OuterSpec`.

    Linear warm-up from 0 over ``warmup`` updates, then constant, cosine or linear decay
    from ``lr`` to ``end_lr`` over the remaining updates.
    """
    decay_steps = max(total_updates - spec.warmup, 1)
    if spec.schedule == "constant":
        main: float | Callable = spec.lr
    elif spec.schedule == "cosine":
        main = optim.cosine_decay(spec.lr, decay_steps, spec.end_lr)
    else:
        main = optim.linear_schedule(spec.lr, spec.end_lr, decay_steps)
    if spec.warmup == 0:
        return main
    warm = optim.linear_schedule(0.0, spec.lr, spec.warmup)
    if not callable(main):
        constant = main
        main = lambda step: mx.array(constant)  # noqa: E731
    return optim.join_schedules([warm, main], [spec.warmup])


def make_optimizer(spec, total_updates: int) -> optim.Optimizer:
    """Adam and AdamW with bias correction, as in Kingma and Ba (2015) and the published
    meta-learning setups (mlx.optimizers leaves it off by default, which makes the first
    updates ~3x larger)."""
    lr = make_schedule(spec, total_updates)
    if spec.optimizer == "adam":
        return optim.Adam(learning_rate=lr, bias_correction=True)
    if spec.optimizer == "adamw":
        return optim.AdamW(learning_rate=lr, weight_decay=spec.weight_decay,
                           bias_correction=True)
    return optim.SGD(learning_rate=lr, momentum=spec.momentum)


def outer_step(optimizer: optim.Optimizer, meta, grad, clip_norm: float | None):
    """(meta-parameters after one outer update, the gradient's norm before clipping).

    The one outer update every executor applies: the in-process trainer inside its
    compiled step, the parameter server on the gradients workers send.
    """
    grad, norm = clip_by_global_norm(grad, clip_norm)
    return optimizer.apply_gradients(grad, meta), norm


def meta_holder(meta) -> dict[str, Any]:
    """``{"meta": meta}`` in new containers around the same arrays, for
    :func:`outer_update` to rewrite: mx.compile swaps the leaves of captured state for
    tracers in place, which must not touch the caller's trees."""
    return {"meta": tree_map(lambda a: a, meta)}


def outer_update(optimizer: optim.Optimizer, holder: dict[str, Any], clip_norm: float | None,
                 compile: bool, gradient: Callable | None = None) -> Callable:
    """One :func:`outer_step` of ``holder["meta"]`` (a :func:`meta_holder`), as one
    ``mx.compile``d graph over the holder and the optimizer's state when ``compile``.

    Without ``gradient``, ``update(grad) -> norm`` applies a gradient computed elsewhere
    (the parameter server, from workers' results). With it, ``update(*args) -> (loss,
    norm)`` first computes ``(grad, loss) = gradient(meta, *args)`` in the same graph (the
    in-process trainer's whole meta-step).
    """
    if gradient is None:
        def update(grad):
            holder["meta"], norm = outer_step(optimizer, holder["meta"], grad, clip_norm)
            return norm
    else:
        def update(*args):
            grad, loss = gradient(holder["meta"], *args)
            holder["meta"], norm = outer_step(optimizer, holder["meta"], grad, clip_norm)
            return loss, norm

    if compile:
        state = [holder, optimizer.state]
        update = mx.compile(update, inputs=state, outputs=state)
    return update


def clip_by_global_norm(grads, max_norm: float | None):
    """(clipped gradients, norm before clipping); no clipping when max_norm is None."""
    if max_norm is None:
        from mlx.utils import tree_flatten

        norm = mx.sqrt(sum(mx.sum(mx.square(g)) for _, g in tree_flatten(grads)))
        return grads, norm
    return optim.clip_grad_norm(grads, max_norm)
