"""models/in_context.py on a tiny random llama saved by the test (tiny_llama.py): the
in-context prompt is the hand-built prompt string's tokenization, its score (through the
prefix's KV cache, queries batched and right-padded) equals the plain mlx-lm module's
logits on that whole string, and with no examples it is the classifier's own score at
B = 0 (zero-shot: the standard init before any step)."""

from __future__ import annotations

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from tiny_llama import save_tiny_llama

from metapeft_dist.models.causal_lm import CausalLMModel
from metapeft_dist.models.in_context import InContext, example_order

KEYS = ("self_attn.q_proj", "self_attn.v_proj")
TEXTS = (
    "The cat sat on the mat.",
    "Stocks fell after the bank raised rates.",
    "The team won the final match.",
    "She cooked rice and beans.",
    "Heavy rain flooded the roads.",
    "A dog ran across the park to catch the red ball.",
)
# The cached corpus states are float16 (models/test_causal_lm.py FLOAT16_ATOL).
FLOAT16_ATOL = 5e-3


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("METAPEFT_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield str(save_tiny_llama(tmp_path_factory.mktemp("tiny_llama")))


@pytest.fixture(scope="module")
def setup(llama_dir):
    model = CausalLMModel(llama_dir, 1, KEYS, 4, 2.0, 48, 3, TEXTS)
    params = model.init(mx.random.key(0))  # B = 0: the base LM
    return model, params, InContext(model, params["inputs.ids"], params["inputs.mask"])


def test_examples_are_shuffled_by_a_fixed_function_of_the_task():
    order = example_order(np.arange(10, 35))
    assert sorted(order) == list(range(25)) and order != list(range(25))
    assert example_order(np.arange(10, 35)) == order
    assert example_order(np.arange(11, 36)) != order
    assert example_order(np.array([], dtype=np.int32)) == []


def test_the_prompt_is_the_hand_built_strings_tokens(llama_dir, setup):
    model, _, scorer = setup
    tokenizer = mlx_lm.load(llama_dir)[1]
    sx, sy = np.array([0, 1, 2, 3]), np.array([1, 0, 2, 0])
    text = "".join(f"Text: {TEXTS[sx[i]]}\nLabel: {'ABC'[sy[i]]}\n\n"
                   for i in example_order(sx)) + f"Text: {TEXTS[5]}\nLabel:"
    assert scorer.prefix(sx, sy) + scorer.query_tokens(5) == tokenizer.encode(text)


def test_the_score_is_the_plain_modules_logits_on_the_whole_prompt(llama_dir, setup):
    """Known answer: the plain mlx-lm module (no LoRA) over the whole hand-built prompt,
    the verbalizer's logits at its last token; queries of different lengths batched on
    copies of the prefix's KV cache, or one at a time, give the same."""
    model, params, scorer = setup
    plain, tokenizer = mlx_lm.load(llama_dir)
    sx, sy, qx = np.array([0, 1, 2]), np.array([2, 0, 1]), np.array([4, 5, 3])
    shots = "".join(f"Text: {TEXTS[sx[i]]}\nLabel: {'ABC'[sy[i]]}\n\n"
                    for i in example_order(sx))
    expected = np.stack([
        np.array(plain(mx.array([tokenizer.encode(f"{shots}Text: {TEXTS[q]}\nLabel:")]))
                 [0, -1, model.verbalizer()]) for q in qx])
    adapters = {n: v for n, v in params.items() if not n.startswith("inputs.")}
    for batch in (8, 1):
        got = np.array(scorer.logits(adapters, sx, sy, qx, batch=batch))
        # a cached prefix and batched queries are differently shaped matmuls than one
        # whole-prompt pass: equal to float32 rounding, not bitwise
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_no_examples_is_zero_shot_the_standard_inits_step_0(setup):
    """With an empty support set the prompt is the query's own: the classifier's logits
    at B = 0, which is the `random` baseline's score before any step."""
    model, params, scorer = setup
    qx = np.array([0, 3, 5])
    got = np.array(scorer.logits(params, np.array([], dtype=np.int32),
                                 np.array([], dtype=np.int32), qx))
    np.testing.assert_allclose(got, np.array(model(params, mx.array(qx))), atol=FLOAT16_ATOL)


CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n"
                 "{% endfor %}{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def test_without_a_chat_template_the_chat_variant_is_refused(setup):
    model, params, _ = setup
    with pytest.raises(ValueError, match="has no chat template; use in_context"):
        InContext(model, params["inputs.ids"], params["inputs.mask"], chat=True)


def test_the_chat_prompt_is_the_templates_string_scored_by_the_plain_module(llama_dir,
                                                                           tmp_path):
    """Known answer: one user message (the instruction, the examples, the query's text),
    the assistant's turn begun with "Label:", tokenized whole and run through the plain
    module; through the shared prefix's cache the same logits."""
    import json
    import shutil

    chat_dir = tmp_path / "chat_llama"
    shutil.copytree(llama_dir, chat_dir)
    config = json.loads((chat_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = CHAT_TEMPLATE
    (chat_dir / "tokenizer_config.json").write_text(json.dumps(config))
    model = CausalLMModel(str(chat_dir), 1, KEYS, 4, 2.0, 48, 3, TEXTS)
    params = model.init(mx.random.key(0))
    scorer = InContext(model, params["inputs.ids"], params["inputs.mask"], chat=True)
    plain, tokenizer = mlx_lm.load(str(chat_dir))
    sx, sy, qx = np.array([0, 1, 2]), np.array([2, 0, 1]), np.array([4, 5, 3])
    shots = "".join(f"Text: {TEXTS[sx[i]]}\nLabel: {'ABC'[sy[i]]}\n\n"
                    for i in example_order(sx))
    strings = [f"<s>user\nLabel each text with one of the letters A, B, C.\n\n{shots}"
               f"Text: {TEXTS[q]}</s>\n<s>assistant\nLabel:" for q in qx]
    prefix, own = scorer.chat_prompts(sx, sy, qx)
    for string, tail in zip(strings, own, strict=True):
        assert prefix + tail == tokenizer.encode(string, add_special_tokens=False)
        assert tail  # every query keeps its own tokens
    expected = np.stack([np.array(plain(mx.array([tokenizer.encode(
        s, add_special_tokens=False)]))[0, -1, model.verbalizer()]) for s in strings])
    adapters = {n: v for n, v in params.items() if not n.startswith("inputs.")}
    got = np.array(scorer.logits(adapters, sx, sy, qx))
    # a cached prefix and batched queries: equal to float32 rounding, not bitwise
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
