"""config.py: every spec in jobs/ validates; bad specs raise one ConfigError naming the
field; the loader never raises anything else, whatever it is fed (hypothesis)."""

from __future__ import annotations

import dataclasses
import typing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metapeft_dist import config
from metapeft_dist.config import ConfigError, JobSpec, from_dict, load_spec, parse_spec

from conftest import JOBS

MINIMAL = "family: {name: sinusoid}\nalgorithm: {name: maml}\n"


def test_every_job_spec_validates():
    specs = sorted(JOBS.glob("*.yaml"))
    assert len(specs) >= 10
    for path in specs:
        spec = load_spec(path)
        assert spec.name == path.stem


def test_minimal_spec_gets_documented_defaults():
    spec = parse_spec(MINIMAL, default_name="m")
    assert spec.name == "m"
    assert spec.inner == config.InnerSpec()
    assert spec.eval.shots == (1, 5, 10)
    assert spec.family.ways is None  # regression
    assert parse_spec("family: {name: digits}\nalgorithm: {name: maml}\n").family.ways == 5
    assert parse_spec("family: {name: gaussian}\nalgorithm: {name: maml}\n").family.ways == 2


def test_the_evaluation_piece_size_defaults_by_model_kind():
    """Unset, eval.chunk is 100 tasks, or 20 for the text models, whose 100-task pieces
    take over 10 GB a worker; set, it is kept."""
    assert parse_spec(MINIMAL).eval.chunk == 100
    text = ("family: {name: wordnet}\nmodel: {kind: encoder, train: lora, lora: {rank: 4}}\n"
            "algorithm: {name: fomaml}\n")
    assert parse_spec(text).eval.chunk == 20
    assert parse_spec(text + "eval: {chunk: 7}").eval.chunk == 7
    assert parse_spec(text).to_dict()["eval"]["chunk"] == 20  # what spec.yaml records


def test_yaml_exponent_without_dot_is_a_float():
    spec = parse_spec(MINIMAL + "outer: {lr: 1e-3}\ninner: {lr: 5E-2}\n")
    assert spec.outer.lr == pytest.approx(1e-3)
    assert spec.inner.lr == pytest.approx(5e-2)


def test_overrides_apply_before_validation():
    spec = parse_spec(MINIMAL, overrides=["algorithm.iterations=7", "eval.shots=[2, 3]",
                                          "model.lora.rank=2", "model.train=lora"])
    assert spec.algorithm.iterations == 7
    assert spec.eval.shots == (2, 3)
    assert spec.model.lora.rank == 2
    with pytest.raises(ConfigError, match="inner.lr: must be > 0"):
        parse_spec(MINIMAL, overrides=["inner.lr=-1"])
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        parse_spec(MINIMAL, overrides=["inner.lr"])


def test_algorithm_sections_are_filled_and_guarded():
    spec = parse_spec("family: {name: sinusoid}\nalgorithm: {name: mamlpp}\n")
    assert spec.algorithm.mamlpp == config.MamlppSpec()
    assert spec.algorithm.reptile is None
    with pytest.raises(ConfigError, match="algorithm.reptile: options for reptile given"):
        parse_spec("family: {name: sinusoid}\n"
                   "algorithm: {name: maml, reptile: {serial: true}}\n")


BAD = [
    # (spec text, the field path the error must name, a phrase it must contain)
    ("family: {name: omniglot}\nalgorithm: {name: maml}", "family.name", "must be one of"),
    ("family: {name: sinusoid}\nalgorithm: {name: sgd}", "algorithm.name", "must be one of"),
    (MINIMAL + "inner: {lr: -0.1}", "inner.lr", "must be > 0, got -0.1"),
    (MINIMAL + "inner: {lr: fast}", "inner.lr", "must be a number"),
    (MINIMAL + "outer: {lr: .nan}", "outer.lr", "finite"),
    (MINIMAL + "inner: {steps: 1.5}", "inner.steps", "must be an integer"),
    (MINIMAL + "inner: {steps: true}", "inner.steps", "must be an integer"),
    (MINIMAL + "run: {compile: 1}", "run.compile", "true or false"),
    (MINIMAL + "inner: {lrr: 0.1}", "inner.lrr", "unknown key"),
    (MINIMAL + "trainer: {}", "trainer", "unknown key"),
    (MINIMAL + "inner: 3", "inner", "must be a mapping"),
    (MINIMAL + "eval: {shots: 5}", "eval.shots", "must be a list"),
    (MINIMAL + "eval: {shots: [1, zero]}", "eval.shots[1]", "must be an integer"),
    ("family: {name: digits, shots: 170, query: 15}\nalgorithm: {name: maml}",
     "family.shots", "exceed the 174 examples"),
    ("family: {name: digits, shots: 5, query: 15}\nalgorithm: {name: maml}\n"
     "eval: {shots: [200]}", "eval.shots", "exceed the 174 examples"),
    ("family: {name: digits, ways: 9}\nalgorithm: {name: maml}", "family.ways",
     "smallest split has 8 classes"),
    ("family: {name: gaussian, ways: 3}\nalgorithm: {name: maml}", "family.ways",
     "always have 2 classes"),
    ("family: {name: sinusoid, ways: 5}\nalgorithm: {name: maml}", "family.ways",
     "regression family"),
    (MINIMAL + "model: {kind: conv}", "model.kind", "needs an image family"),
    (MINIMAL + "model: {train: lora}", "model.train", "needs a model.lora section"),
    (MINIMAL + "model: {hidden: []}", "model.hidden", "non-empty"),
    (MINIMAL + "outer: {clip_norm: 0}", "outer.clip_norm", "must be > 0"),
    (MINIMAL + "outer: {lr: 0.1, end_lr: 0.5}", "outer.end_lr", "must be in [0, lr"),
    (MINIMAL + "eval: {baselines: [random, random]}", "eval.baselines", "duplicates"),
    (MINIMAL + "eval: {baselines: [finetuned]}", "eval.baselines[0]", "must be one of"),
    (MINIMAL + "eval: {every: 0}", "eval.select", "best needs meta-validation"),
    (MINIMAL + "eval: {baselines: [random, in_context]}", "eval.baselines",
     "in_context (prompting with the support set) applies to kind causal_lm, not mlp"),
    ("family: {name: wordnet, ways: 5}\nmodel: {kind: encoder, train: lora, lora: {}}\n"
     "algorithm: {name: fomaml}\neval: {baselines: [in_context]}", "eval.baselines",
     "applies to kind causal_lm, not encoder"),
    ("family: {name: wordnet, ways: 5}\nmodel: {kind: encoder, train: lora, lora: {},"
     " label_loss: vocabulary}\nalgorithm: {name: fomaml}", "model.label_loss",
     "applies to kind causal_lm, not encoder"),
    (MINIMAL + "eval: {baselines: [in_context, in_context_chat]}", "eval.baselines",
     "in_context, in_context_chat (prompting with the support set) applies to kind "
     "causal_lm, not mlp"),
    (MINIMAL.replace("{name: maml}", "{name: reptile, reptile: {serial: true}}"),
     "algorithm.reptile.serial", "use runtime.mode: local"),
    (MINIMAL + "runtime: {chunk: 30}", "runtime.chunk", "exceeds algorithm.meta_batch = 25"),
    (MINIMAL + "runtime: {mode: spark}", "runtime.mode", "must be one of"),
    (MINIMAL + "runtime: {workers: 0}", "runtime.workers", "must be >= 1"),
    (MINIMAL + "name: 'my job!'", "name", "letters, digits"),
    (MINIMAL + "seed: -1", "seed", "must be >= 0"),
    ("algorithm: {name: maml}", "family", "missing (required)"),
    ("family: {name: sinusoid}", "algorithm", "missing (required)"),
    ("", "", "is empty"),
    ("- a\n- b", "", "must be a mapping of sections"),
    ("family: {name: sinusoid\n", "", "not valid YAML at line"),
    (MINIMAL + "\nfamily: {name: digits}", "", "key 'family' is given twice"),
    ("family: {name: sinusoid, name: digits}\nalgorithm: {name: maml}", "",
     "key 'name' is given twice"),
    ("{{}}", "", "a key must be a plain value, not a mapping"),  # found by the fuzz test
    ("{[a]: 1}", "", "a key must be a plain value, not a list"),
]


@pytest.mark.parametrize("text,path,phrase", BAD)
def test_bad_spec_names_the_field(text, path, phrase):
    with pytest.raises(ConfigError) as info:
        parse_spec(text, source="bad.yaml")
    first_path, message = info.value.errors[0]
    assert first_path == path
    assert phrase in message
    assert "\n" not in str(info.value)


def test_all_errors_are_collected():
    with pytest.raises(ConfigError) as info:
        parse_spec(MINIMAL + "inner: {lr: -1, steps: 0}\nouter: {lr: x}\n")
    paths = {p for p, _ in info.value.errors}
    assert paths == {"inner.lr", "inner.steps", "outer.lr"}
    assert str(info.value).endswith("(and 2 more)")


def test_missing_and_directory_paths(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_spec(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is a directory"):
        load_spec(tmp_path)


def test_reference_lists_every_field():
    ref = config.reference()

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            name = f"{prefix}.{f.name}" if prefix else f.name
            assert f"`{name}`" in ref, name
            assert f.metadata.get("help"), f"{name} has no help text"
            tp = hints[f.name]
            if typing.get_origin(tp) is dict:  # named sections: cost.nodes.NAME.*
                walk(typing.get_args(tp)[1], f"{name}.NAME")
                continue
            for sub in typing.get_args(tp) or (tp,):
                if dataclasses.is_dataclass(sub):
                    walk(sub, name)

    walk(JobSpec, "")


def test_to_dict_round_trips():
    spec = load_spec(JOBS / "quickstart.yaml")
    assert from_dict(spec.to_dict()) == spec


# --- fuzzing: the loader only ever returns a JobSpec or raises ConfigError -------------

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8))
keys = st.sampled_from(["family", "algorithm", "model", "inner", "outer", "eval", "name",
                        "seed", "lr", "steps", "shots", "ways", "query", "kind", "hidden",
                        "lora", "rank", "train", "mamlpp", "reptile", "serial", "bogus",
                        "baselines", "run", "compile", "checkpoint", "every"])
values = st.recursive(scalars, lambda children: st.one_of(
    st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=5)),
    max_leaves=20)


def _mutations():
    good = load_spec(JOBS / "quickstart.yaml").to_dict()

    def mutate(path_value):
        path, value = path_value
        data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in good.items()}
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {}) if isinstance(node.get(part), dict) else node
        node[path[-1]] = value
        return data

    paths = st.lists(keys, min_size=1, max_size=3)
    return st.tuples(paths, values).map(mutate)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(values, st.dictionaries(keys, values, max_size=6), _mutations()))
def test_fuzz_from_dict_only_raises_config_error(data):
    try:
        spec = from_dict(data)
    except ConfigError as err:
        assert err.errors and all(isinstance(m, str) and m for _, m in err.errors)
    else:
        assert isinstance(spec, JobSpec)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_fuzz_parse_spec_text(text):
    try:
        spec = parse_spec(text)
    except ConfigError as err:
        assert err.errors
    else:
        assert isinstance(spec, JobSpec)


def test_docs_reference_is_current():
    from conftest import ROOT

    page = (ROOT / "docs" / "job-spec.md").read_text()
    assert page.strip() == config.reference().strip(), (
        "docs/job-spec.md is stale: python -m metapeft_dist.config > docs/job-spec.md")


def test_a_config_error_survives_pickling_whole():
    """It crosses process boundaries (a Ray worker's error reaches the driver)."""
    import pickle

    err = ConfigError([("family.path", "/x is not a directory"), ("inner.lr", "must be > 0")])
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is ConfigError and back.lines() == err.lines()
    assert str(back) == "family.path: /x is not a directory (and 1 more)"
