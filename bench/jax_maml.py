"""The reference `make bench`'s speed section holds metapeft to: the sinusoid MAML of
jobs/sinusoid-maml.yaml (K = 10 support and 10 query points, meta-batch 25, one inner
SGD step at 0.01, Adam 1e-3, MLP 1-40-40-1 ReLU) written as a JAX user writes it:
``jax.grad`` through the inner step (``stop_gradient`` on the inner gradient for first
order), ``jax.vmap`` over the meta-batch, ``jax.jit`` of the whole meta-step including
Adam, the meta-batch sampled with numpy and the loss read back every iteration, as a
training loop does; XLA on one thread.

Runs in its own virtual environment (bench/run.py makes .bench/jax-venv): JAX is never a
dependency of the package. Prints one JSON line: meta-iterations per second and the
process's CPU seconds per meta-iteration (all its threads).

    python bench/jax_maml.py --order second --iterations 2000
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false "
                                   "intra_op_parallelism_threads=1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

SHOTS, QUERY, META_BATCH = 10, 10, 25
INNER_LR, OUTER_LR, BETAS, EPS = 0.01, 1e-3, (0.9, 0.999), 1e-8


def init_params(seed: int) -> list[tuple[jnp.ndarray, jnp.ndarray]]:
    rng = np.random.default_rng(seed)
    sizes = [1, 40, 40, 1]
    return [(jnp.asarray(rng.normal(0, np.sqrt(2 / a), (a, b)), jnp.float32),
             jnp.zeros(b, jnp.float32)) for a, b in zip(sizes[:-1], sizes[1:], strict=True)]


def forward(params, x):
    for w, b in params[:-1]:
        x = jax.nn.relu(x @ w + b)
    w, b = params[-1]
    return x @ w + b


def mse(params, x, y):
    return jnp.mean((forward(params, x) - y) ** 2)


def make_step(first_order: bool):
    def task_loss(params, sx, sy, qx, qy):
        g = jax.grad(mse)(params, sx, sy)
        if first_order:
            g = jax.lax.stop_gradient(g)
        adapted = jax.tree_util.tree_map(lambda p, d: p - INNER_LR * d, params, g)
        return mse(adapted, qx, qy)

    def meta_loss(params, batch):
        return jnp.mean(jax.vmap(task_loss, in_axes=(None, 0, 0, 0, 0))(params, *batch))

    @jax.jit
    def step(params, m, v, t, batch):
        loss, g = jax.value_and_grad(meta_loss)(params, batch)
        t = t + 1
        b1, b2 = BETAS
        m = jax.tree_util.tree_map(lambda a, d: b1 * a + (1 - b1) * d, m, g)
        v = jax.tree_util.tree_map(lambda a, d: b2 * a + (1 - b2) * d * d, v, g)
        scale = OUTER_LR * jnp.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        params = jax.tree_util.tree_map(lambda p, a, b: p - scale * a / (jnp.sqrt(b) + EPS),
                                        params, m, v)
        return params, m, v, t, loss

    return step


def sample(rng: np.random.Generator):
    """A meta-batch of sinusoid tasks (amplitude 0.1-5, phase 0-pi, x in [-5, 5])."""
    amp = rng.uniform(0.1, 5.0, (META_BATCH, 1, 1)).astype(np.float32)
    phase = rng.uniform(0.0, np.pi, (META_BATCH, 1, 1)).astype(np.float32)
    x = rng.uniform(-5.0, 5.0, (META_BATCH, SHOTS + QUERY, 1)).astype(np.float32)
    y = amp * np.sin(x - phase)
    return x[:, :SHOTS], y[:, :SHOTS], x[:, SHOTS:], y[:, SHOTS:]


def rate(order: str, iterations: int, warmup: int = 50) -> tuple[float, float]:
    """(meta-iterations per second, the process's CPU seconds per meta-iteration)."""
    step = make_step(order == "first")
    params = init_params(0)
    m = jax.tree_util.tree_map(jnp.zeros_like, params)
    v = jax.tree_util.tree_map(jnp.zeros_like, params)
    t = jnp.zeros((), jnp.float32)
    rng = np.random.default_rng(0)
    for _ in range(warmup):  # the compile
        params, m, v, t, loss = step(params, m, v, t, sample(rng))
        float(loss)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(iterations):
        params, m, v, t, loss = step(params, m, v, t, sample(rng))
        float(loss)  # read back every iteration, as a training loop does
    return (iterations / (time.perf_counter() - start),
            (time.process_time() - cpu) / iterations)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--order", choices=("first", "second"), default="second")
    parser.add_argument("--iterations", type=int, default=2000)
    args = parser.parse_args()
    per_second, cpu = rate(args.order, args.iterations)
    print(json.dumps({"order": args.order, "iterations_per_second": per_second,
                      "cpu_seconds_per_iteration": cpu, "jax": jax.__version__}))


if __name__ == "__main__":
    main()
