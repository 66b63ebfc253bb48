"""The tokenizer of a GGUF file, from its metadata: byte-level BPE
(``tokenizer.ggml.model == "gpt2"``) over the vocabulary and merges, with the
pre-tokenizer that ``tokenizer.ggml.pre`` names in llama.cpp, control tokens as special
tokens; and the ``tokenizer_config.json`` mlx-lm reads beside it (models/gguf.py writes
both into the converted model directory)."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

# llama.cpp's pre-tokenizers (tokenizer.ggml.pre) that split single digits before the
# GPT-2 regex, as Hugging Face's Digits(individual_digits) + ByteLevel does.
DIGITS_PRE = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values of added tokens


def build_tokenizer(meta: dict, path: Path):
    """(``tokenizers.Tokenizer``, tokenizer_config.json dict) from the GGUF vocabulary."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers import processors

    kind, pre = meta["tokenizer.ggml.model"], meta.get("tokenizer.ggml.pre", "gpt2")
    if kind != "gpt2":
        raise ValueError(f"{path}: tokenizer {kind!r} is not supported (only byte-level BPE, "
                         f"'gpt2')")
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", False))
    if pre in DIGITS_PRE or pre == "gpt2":
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=prefix, use_regex=True)
        steps = [pre_tokenizers.Digits(individual_digits=True)] if pre in DIGITS_PRE else []
        pre_tokenizer = pre_tokenizers.Sequence([*steps, byte_level])
    elif pre == "llama-bpe":
        pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=prefix, use_regex=False)])
    else:
        raise ValueError(f"{path}: pre-tokenizer {pre!r} is not supported (supported: gpt2, "
                         f"llama-bpe, {', '.join(DIGITS_PRE)})")
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    types = meta.get("tokenizer.ggml.token_type")
    types = types.tolist() if isinstance(types, mx.array) else [1] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError(f"{path}: {len(types)} token types for {len(tokens)} tokens")
    kinds = dict(zip(tokens, types, strict=True))

    def token(key: str) -> str | None:
        index = meta.get(key)
        return tokens[int(index)] if index is not None and int(index) < len(tokens) else None

    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                     unk_token=token("tokenizer.ggml.unknown_token_id"), fuse_unk=False,
                     byte_fallback=False, ignore_merges=pre == "llama-bpe")
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, k in kinds.items() if k == CONTROL])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t, k in kinds.items() if k == USER_DEFINED])
    bos, eos = token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    if add_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, tokens.index(bos))])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
              "pad_token": token("tokenizer.ggml.padding_token_id") or eos,
              "unk_token": token("tokenizer.ggml.unknown_token_id"),
              "add_bos_token": add_bos, "add_prefix_space": prefix,
              "clean_up_tokenization_spaces": False,
              "model_max_length": int(meta.get("llama.context_length", 2048))}
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return tokenizer, config
