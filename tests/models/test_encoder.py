"""models/encoder.py and the encoder's job spec: indices into a corpus give the logits of
the full encoder pass (the cached frozen layers change nothing but speed), the cache is
reused from disk, the `head` baseline tunes the head alone, and a text job meta-trains
end to end (in process and on Ray) with only adapters and the head travelling."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from metapeft_dist.config import ConfigError, parse_spec
from metapeft_dist.models import bert, split_trainable
from metapeft_dist.models import encoder as encoder_module
from metapeft_dist.models.encoder import LOGIT_SCALE
from metapeft_dist.runtime.checkpoint import load_checkpoint

try:
    MINILM = bert.minilm_path()
except FileNotFoundError as missing:
    pytest.skip(str(missing), allow_module_level=True)

TOPICS = {
    "weather": ["It is raining heavily today.", "A storm is coming tonight.",
                "The sun is shining and it is warm.", "Snow fell all night long.",
                "Strong winds knocked down trees.", "Fog covered the valley at dawn.",
                "Thunder rolled over the hills.", "It will be cloudy tomorrow."],
    "food": ["I cooked pasta with tomato sauce.", "The bread is fresh from the oven.",
             "She ordered a pizza for dinner.", "We ate apples and cheese.",
             "The soup needs more salt.", "He baked a chocolate cake.",
             "Rice and beans make a good meal.", "The restaurant serves fresh fish."],
    "sports": ["The team won the football match.", "She runs a marathon every year.",
               "He scored a goal in the final minute.", "The tennis player served an ace.",
               "They swim laps in the pool.", "The cyclist climbed the mountain pass.",
               "Our basketball coach called a timeout.", "The boxer trained for the fight."],
    "music": ["The band played a loud rock song.", "She practices the piano daily.",
              "The orchestra tuned their violins.", "He sang a ballad on stage.",
              "The drummer kept a steady beat.", "We listened to jazz all evening.",
              "The choir rehearsed a new hymn.", "A guitarist played the blues."],
}


def _jsonl_dir(tmp_path):
    """Three task files (two topics each), so train / val / test each get one."""
    pairs = [("weather", "food"), ("sports", "music"), ("food", "music")]
    tmp_path.mkdir(parents=True, exist_ok=True)
    for i, pair in enumerate(pairs):
        lines = [json.dumps({"text": text, "label": topic})
                 for topic in pair for text in TOPICS[topic]]
        (tmp_path / f"task{i}.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def _spec(data_dir, **extra) -> str:
    lines = [
        "name: enc",
        f"family: {{name: jsonl, path: {data_dir}, ways: 2, shots: 2, query: 2}}",
        "model: {kind: encoder, train: lora, max_len: 16, lora: {rank: 2, layers: 1}}",
        "algorithm: {name: fomaml, meta_batch: 2, iterations: 4}",
        "inner: {steps: 2, lr: 0.1}",
        # the standard init's Adam fine-tune (200 steps on 20 tasks by default) is
        # tested in test_evaluate/test_runner; here three steps on two tasks suffice
        "eval: {tasks: 4, shots: [2], steps: 2, every: 2, val_tasks: 2, chunk: 4,",
        "       finetune: {steps: 3, tasks: 2}}",
        "checkpoint: {every: 2}",
        "metrics: {enabled: false}",
    ] + [f"{key}: {value}" for key, value in extra.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("METAPEFT_CACHE", str(tmp_path / "cache"))
    encoder_module._corpus_states.cache_clear()
    yield tmp_path / "cache"
    encoder_module._corpus_states.cache_clear()


def test_indices_give_the_full_encoder_pass_and_the_cache_is_reused(tmp_path, cache, capfd):
    from metapeft_dist.job import build_job

    spec = parse_spec(_spec(_jsonl_dir(tmp_path / "data")))
    job = build_job(spec)
    assert "encoding 48 texts" in capfd.readouterr().err
    model = job.model
    assert model.adapted_layers == (5,) and model.start_layer == 5
    params = {**job.frozen, **job.initial_meta["params"]}
    # Only adapters and the head are meta-learned: 2 projections x (A, B) + head w, b.
    assert sorted(job.initial_meta["params"]) == [
        "encoder.layer.5.attention.self.query.lora_a",
        "encoder.layer.5.attention.self.query.lora_b",
        "encoder.layer.5.attention.self.value.lora_a",
        "encoder.layer.5.attention.self.value.lora_b", "head.b", "head.w"]
    # Give B a value so the adapters matter, then compare with the uncached full pass.
    params = {**params, **{k: mx.full(v.shape, 0.05) for k, v in params.items()
                           if k.endswith("lora_b")}}
    indices = mx.array([0, 7, 20, 47])
    texts = [job.family.corpus.texts[i] for i in (0, 7, 20, 47)]
    _, base = bert.load_bert(MINILM)
    ids, mask = bert.Tokenizer(MINILM).encode(texts, 16)
    full = LOGIT_SCALE * bert.classify({**base, **params}, model.config, ids, mask,
                                       model.lora_scale)
    cached = model(params, indices)
    assert cached.shape == (4, 2)
    # The cached states are float16: agreement to ~1e-3 of the logits' scale.
    np.testing.assert_allclose(np.array(cached), np.array(full), atol=2e-2)
    assert [p.name for p in cache.glob("encoder/*.safetensors")]  # written to disk

    encoder_module._corpus_states.cache_clear()  # a new process: the disk cache serves
    again = build_job(spec)
    assert "encoding" not in capfd.readouterr().err
    np.testing.assert_array_equal(np.array(again.model(params, indices)), np.array(cached))


def test_head_baseline_tunes_the_head_alone(tmp_path, cache):
    from metapeft_dist.job import build_job

    job = build_job(parse_spec(_spec(_jsonl_dir(tmp_path / "data"))))
    head, random = job.baseline("head"), job.baseline("random")
    assert sorted(head.meta["params"]) == ["head.b", "head.w"]
    # The same fresh head as the standard (random) init; its adapters frozen at B = 0.
    for name in ("head.w", "head.b"):
        assert mx.array_equal(head.meta["params"][name],
                              random.meta["params"][name])
    assert not mx.any(head.frozen["encoder.layer.5.attention.self.query.lora_b"]).item()
    trainable, frozen = split_trainable(job.model.init(mx.random.key(0)), "lora")
    assert "inputs.hidden" in frozen and "inputs.hidden" not in trainable


@pytest.mark.parametrize("text, phrase", [
    ("family: {name: wordnet}\nalgorithm: {name: fomaml}\n",
     "model.kind: wordnet is a text family: use kind encoder or causal_lm"),
    ("family: {name: digits}\nalgorithm: {name: fomaml}\n"
     "model: {kind: encoder, train: lora, lora: {}}\n", "model.kind: encoder needs a text family"),
    ("family: {name: wordnet}\nalgorithm: {name: fomaml}\nmodel: {kind: encoder}\n",
     "model.train: the encoder's weights stay frozen"),
    ("family: {name: wordnet}\nalgorithm: {name: fomaml}\n"
     "model: {kind: encoder, train: lora, lora: {}, base: pretrained}\n",
     "model.base: the encoder is pretrained already"),
    ("family: {name: wordnet}\nalgorithm: {name: fomaml}\n"
     "model: {kind: encoder, train: lora, lora: {}}\neval: {baselines: [pretrained]}\n",
     "eval.baselines: pretrained does not apply to the encoder"),
    ("family: {name: digits}\nalgorithm: {name: fomaml}\n"
     "model: {train: lora, lora: {layers: 1}}\n",
     "model.lora.layers: applies to kinds encoder and causal_lm"),
    ("family: {name: wordnet}\nalgorithm: {name: fomaml}\n"
     "model: {kind: encoder, train: lora, lora: {targets: [query, attention]}}\n",
     "model.lora.targets"),
    ("family: {name: wordnet}\nalgorithm: {name: fomaml}\n"
     "model: {kind: encoder, train: lora, lora: {}, max_len: 1}\n", "model.max_len: must be >= 2"),
    ("family: {name: wordnet}\nalgorithm: {name: fomaml}\n"
     "model: {kind: causal_lm, train: lora, lora: {}}\n", "model.path: causal_lm needs path"),
    ("family: {name: wordnet}\nalgorithm: {name: fomaml}\n"
     "model: {kind: causal_lm, path: m, train: lora, lora: {}}\neval: {baselines: [head]}\n",
     "eval.baselines: head does not apply to causal_lm"),
    ("family: {name: jsonl, path: d, ways: 27}\nalgorithm: {name: fomaml}\n"
     "model: {kind: causal_lm, path: m, train: lora, lora: {}}\n",
     "family.ways: causal_lm verbalizes labels as the letters A-Z: at most 26"),
    ("family: {name: digits}\nalgorithm: {name: fomaml}\nmodel: {path: m}\n",
     "model.path: applies to kinds encoder and causal_lm"),
])
def test_bad_encoder_specs_name_the_field(text, phrase):
    with pytest.raises(ConfigError) as err:
        parse_spec(text)
    assert any(phrase in line for line in err.value.lines()), err.value.lines()


def test_encoder_defaults_compare_with_random_and_head():
    spec = parse_spec("family: {name: wordnet}\nalgorithm: {name: fomaml}\n"
                      "model: {kind: encoder, train: lora, lora: {}}\n")
    assert spec.eval.baselines == ("random", "head")
    assert parse_spec("family: {name: digits}\nalgorithm: {name: fomaml}\n"
                      ).eval.baselines == ("random", "pretrained")


@pytest.mark.parametrize("mode", ["local", "sync"])
def test_a_text_job_meta_trains_end_to_end(tmp_path, cache, mode, local_ray):
    """In process and on Ray (2 workers, which build the encoder and its cache
    themselves): the job runs, the adapters move, and every init is evaluated."""
    from metapeft_dist import api

    text = _spec(_jsonl_dir(tmp_path / "data"), runtime=f"{{mode: {mode}, chunk: 1}}")
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(text)
    results = api.run(str(spec_file), tmp_path / "run")
    inits = results["evaluation"]["shots"]["2"]["inits"]
    assert set(inits) == {"meta", "random", "head"}
    assert all(len(entry["mean"]) == 3 for entry in inits.values())  # steps 0, 1, 2
    assert results["runtime"]["tasks_completed"] == 4 * 2
    assert results["runtime"]["outer_updates"] == 4
    # The checkpoint holds adapters and head only, and meta-training moved them.
    final = load_checkpoint(results["meta_training"]["checkpoint"])
    # Nothing frozen is stored: the encoder's weights are the model directory, its
    # corpus states are rebuilt; so a checkpoint is the adapters, the head and state.
    assert final.frozen == {}
    assert Path(final.path).stat().st_size < 200_000
    trained = final.meta["params"]
    names = set(trained)
    assert names and all(n.endswith(("lora_a", "lora_b")) or n.startswith("head.")
                         for n in names)
    assert any(mx.any(trained[n]).item() for n in names if n.endswith("lora_b"))
