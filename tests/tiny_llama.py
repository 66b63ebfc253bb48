"""A tiny random llama saved as an mlx-lm model directory, for tests that must not touch
the network: ``save_tiny_llama(directory)`` writes config.json, model.safetensors,
tokenizer.json and tokenizer_config.json, which ``mlx_lm.load(directory)`` loads offline.

The tokenizer is a byte-level BPE trained (with the ``tokenizers`` package) on a small
fixed English text that holds the classifier's prompt ("Text: ...\\nLabel: A"), so the
verbalizer tokens " A", " B", ... are single tokens as in real LLM vocabularies. The
weights are random with a fixed seed: same directory contents on every run.
``save_tiny_tasks(directory)`` writes a few two-label JSONL tasks for it.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

HIDDEN = 64
LAYERS = 2
HEADS = 4
INTERMEDIATE = 128
VOCAB = 1024
SPECIALS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2

_SENTENCES = (
    "The cat sat on the mat and looked at the bird in the tree.",
    "A dog ran across the park to catch the red ball.",
    "Stocks fell sharply after the bank raised interest rates again.",
    "The team won the final match with a late goal in extra time.",
    "Scientists found water on a small moon far from the sun.",
    "She cooked rice, beans and fresh vegetables for dinner.",
    "The new phone has a faster chip and a brighter screen.",
    "Heavy rain flooded the roads in the north of the city.",
    "He read an old book about ships, kings and distant islands.",
    "Children played music and sang songs at the school party.",
)


def training_text() -> list[str]:
    """The fixed text the tokenizer is trained on: plain sentences, and each of them as a
    labelled prompt with every letter as its label."""
    lines = list(_SENTENCES)
    for i, sentence in enumerate(_SENTENCES):
        for letter in string.ascii_uppercase:
            lines.append(f"Text: {sentence}\nLabel: {letter}")
        lines.append(f"Label: {string.ascii_uppercase[i]} is the answer.")
    return lines


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(training_text(), trainer)
    bos = SPECIALS[1]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tokenizer.token_to_id(bos))])
    return tokenizer


def model_config(vocab_size: int) -> dict:
    return {
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS,
        "intermediate_size": INTERMEDIATE,
        "vocab_size": vocab_size,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 256,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def random_weights(config: dict, seed: int = 0) -> dict[str, mx.array]:
    """mlx-lm's llama parameters with fresh values drawn from ``seed``: norms at one,
    matrices normal with std 1/sqrt(fan_in), embeddings std 0.1 (tied logits of order
    one). Explicit keys, so the global PRNG is left alone."""
    from mlx_lm.models import llama

    model = llama.Model(llama.ModelArgs.from_dict(config))
    shapes = sorted((name, p.shape) for name, p in tree_flatten(model.parameters()))
    keys = mx.random.split(mx.random.key(seed), len(shapes))
    weights = {}
    for key, (name, shape) in zip(keys, shapes, strict=True):
        if name.endswith("norm.weight"):
            weights[name] = mx.ones(shape)
        elif "embed_tokens" in name:
            weights[name] = 0.1 * mx.random.normal(shape, key=key)
        else:
            weights[name] = mx.random.normal(shape, key=key) / shape[-1] ** 0.5
    return weights


def save_tiny_llama(directory, seed: int = 0) -> Path:
    """Write the tiny llama into ``directory`` (created if missing) and return its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIALS[1], "eos_token": SPECIALS[2], "pad_token": SPECIALS[0],
        "model_max_length": 256, "clean_up_tokenization_spaces": False,
    }, indent=1))
    config = model_config(tokenizer.get_vocab_size())
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    mx.save_safetensors(str(directory / "model.safetensors"), random_weights(config, seed))
    return directory


def save_tiny_tasks(directory, files: int = 3) -> dict[str, bytes]:
    """Write ``files`` two-label JSONL tasks (6 texts per label) into ``directory``
    (created) and return their contents by file name."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    words = {"weather": "rain storm sun snow wind fog", "food": "pasta bread pizza soup cake pie"}
    for i in range(files):
        (directory / f"task{i}.jsonl").write_text("".join(
            json.dumps({"text": f"{word} {i}", "label": label}) + "\n"
            for label, line in words.items() for word in line.split()))
    return {f.name: f.read_bytes() for f in directory.iterdir()}
