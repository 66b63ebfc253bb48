"""tasks/text.py: the shipped text data rebuilds from its Debian packages and matches the
catalog; category splits are disjoint and cover the data; an episode is a function of its
key, balanced, and indexes only its split's texts; users' JSONL tasks sample the same way
and every kind of bad file is one ConfigError line naming file:line."""

from __future__ import annotations

import codecs
import gzip
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from metapeft_dist.config import ConfigError, FamilySpec, parse_spec
from metapeft_dist.tasks import make_family
from metapeft_dist.tasks.base import TaskKey, sample_batch
from metapeft_dist.tasks.catalog import FAMILIES, SPLITS
from metapeft_dist.tasks.text import (DATA_FILE, load_shipped, shipped_corpus, split_categories,
                                      read_task, split_counts, split_files)

ROOT = Path(__file__).resolve().parents[2]
BUILDER = ROOT / "scripts" / "build_text_data.py"
SHIPPED = ("wordnet", "fortunes")


def builder():
    spec = importlib.util.spec_from_file_location("build_text_data", BUILDER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def installed_version(package: str) -> str | None:
    if shutil.which("dpkg-query") is None:
        return None
    done = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package],
                          capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def test_shipped_data_rebuilds_byte_identical_from_the_debian_packages(tmp_path):
    if not Path("/usr/share/wordnet/data.noun").exists():
        pytest.skip("wordnet-base is not installed (/usr/share/wordnet absent)")
    if not Path("/usr/share/games/fortunes/computers").exists():
        pytest.skip("fortunes is not installed (/usr/share/games/fortunes absent)")
    for package, version in load_shipped()["meta"]["packages"].items():
        if installed_version(package) != version:
            pytest.skip(f"{package} {installed_version(package)} is installed; the shipped "
                        f"file was built from {version}")
    out, notice = tmp_path / "text.json.gz", tmp_path / "NOTICE.md"
    subprocess.run([sys.executable, str(BUILDER), "--out", str(out), "--notice", str(notice)],
                   check=True, capture_output=True)
    # The JSON is compared byte for byte; the gzip framing too, except where the
    # compressor itself differs (another zlib build may pack the same bytes differently).
    assert gzip.decompress(out.read_bytes()) == gzip.decompress(DATA_FILE.read_bytes())
    assert out.read_bytes()[:10] == DATA_FILE.read_bytes()[:10]  # header: no name, mtime 0
    assert notice.read_text() == (DATA_FILE.parent / "NOTICE-text-data.md").read_text()


def test_shipped_data_has_all_45_supersenses_and_its_stated_caps():
    data = load_shipped()
    assert sorted(data["wordnet"]) == sorted(builder().LEXNAMES)
    assert len(data["wordnet"]) == 45
    meta = data["meta"]
    assert meta["dropped"] == {"wordnet": {},
                               "fortunes": {"magic": 30, "pratchett": 2, "translate-me": 12}}
    assert len(data["fortunes"]) == 38
    assert not set(data["fortunes"]) & (set(meta["excluded"]["fortunes"]) | {"off"})
    caps = meta["caps"]
    for source in SHIPPED:
        for name, texts in data[source].items():
            assert caps["min_per_category"] <= len(texts) <= caps["max_per_category"], name
            assert len(set(texts)) == len(texts)
            for t in texts:
                assert 0 < len(t) <= caps["max_chars"] and t == " ".join(t.split())
    assert data["wordnet"]["noun.animal"][0].count(": ") >= 1  # "<lemma>: <gloss>"
    assert DATA_FILE.stat().st_size < 2 * 2**20


@pytest.mark.parametrize("source", SHIPPED)
def test_catalog_matches_the_data(source):
    corpus = shipped_corpus(source)
    info = FAMILIES[source]
    splits = split_categories(corpus.names)
    assert {s: len(v) for s, v in splits.items()} == info.classes_per_split
    assert min(len(m) for m in corpus.members()) == info.min_class_size
    assert info.input_shape == () and not info.image and info.kind == "classification"
    assert corpus.labels.dtype == np.int32 and len(corpus.labels) == len(corpus.texts)


@pytest.mark.parametrize("source", SHIPPED)
def test_category_splits_are_disjoint_and_cover_the_data(source):
    names = shipped_corpus(source).names
    parts = [set(split_categories(names)[s]) for s in SPLITS]
    assert sum(map(len, parts)) == len(set().union(*parts)) == len(names)


def test_split_rules():
    assert split_counts(45) == {"train": 27, "val": 7, "test": 11}
    assert split_counts(38) == {"train": 23, "val": 6, "test": 9}
    names = shipped_corpus("wordnet").names
    test = [names[i] for i in split_categories(names)["test"]]
    assert test == ["adj.all", "noun.Tops", "noun.artifact", "noun.attribute", "noun.object",
                    "noun.possession", "verb.cognition", "verb.competition",
                    "verb.consumption", "verb.possession", "verb.weather"]
    for n in range(3, 40):
        parts = split_files(n)
        assert [p.start for p in parts.values()][0] == 0 and parts["test"].stop == n
        assert parts["train"].stop == parts["val"].start and parts["val"].stop == \
            parts["test"].start
        assert min(len(p) for p in parts.values()) >= 1
    assert {s: list(r) for s, r in split_files(4).items()} == \
        {"train": [0, 1], "val": [2], "test": [3]}


def check_episode(ep, corpus, allowed, ways, shots, query):
    """Balanced int32 labels; valid, distinct indices; one corpus category per label."""
    assert ep.support_x.shape == (ways * shots,) and ep.query_x.shape == (ways * query,)
    for a in ep.arrays():
        assert a.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(ep.support_y, minlength=ways), [shots] * ways)
    np.testing.assert_array_equal(np.bincount(ep.query_y, minlength=ways), [query] * ways)
    x = np.concatenate([ep.support_x, ep.query_x])
    y = np.concatenate([ep.support_y, ep.query_y])
    assert x.min() >= 0 and x.max() < len(corpus.texts)
    assert len(set(x.tolist())) == len(x)
    categories = [set(corpus.labels[x[y == c]].tolist()) for c in range(ways)]
    assert all(len(c) == 1 for c in categories)
    chosen = set().union(*categories)
    assert len(chosen) == ways and chosen <= set(allowed)


@pytest.mark.parametrize("source", SHIPPED)
def test_episodes_are_keyed_balanced_and_from_their_split(source):
    fam = make_family(FamilySpec(name=source, ways=5))
    for split in SPLITS:
        for i in range(10):
            ep = fam.sample(TaskKey(0, split, 3, i), 2, 3)
            check_episode(ep, fam.corpus, fam.splits[split], 5, 2, 3)
    key = TaskKey(3, "train", 17, 4)
    a, b = fam.sample(key, 2, 3), fam.sample(key, 2, 3)
    for x, y in zip(a.arrays(), b.arrays(), strict=True):
        np.testing.assert_array_equal(x, y)
    batch = sample_batch(fam, 3, "train", 17, [2, 3, 4], 2, 3)
    np.testing.assert_array_equal(batch.query_x[2], a.query_x)
    for other in (TaskKey(3, "train", 18, 4), TaskKey(3, "train", 17, 5),
                  TaskKey(4, "train", 17, 4)):
        assert not np.array_equal(fam.sample(other, 2, 3).query_x, a.query_x)


@pytest.mark.parametrize("source", SHIPPED)
def test_pretrain_batches_cover_the_meta_train_categories_only(source):
    fam = make_family(FamilySpec(name=source))
    x, y = fam.pretrain_batch(np.random.default_rng(0), 3000)
    assert x.dtype == np.int32 and y.dtype == np.int32 and x.shape == y.shape == (3000,)
    assert fam.pretrain_outputs == FAMILIES[source].classes_per_split["train"]
    assert set(y.tolist()) == set(range(fam.pretrain_outputs))
    np.testing.assert_array_equal(fam.corpus.labels[x], np.array(fam.splits["train"])[y])


def write_task(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def rows(prefix: str, labels, per_label: int = 6):
    return [{"text": f"{prefix} {label} {i}", "label": label}
            for i in range(per_label) for label in labels]


@pytest.fixture
def task_dir(tmp_path):
    write_task(tmp_path / "a_sports.jsonl", rows("a", ["goal", "foul", "offside"]))
    write_task(tmp_path / "b_digits.jsonl", rows("b", [0, 1, 2]))
    write_task(tmp_path / "c_food.jsonl", rows("c", ["sweet", "sour", "bitter"]))
    write_task(tmp_path / "d_law.jsonl", rows("d", ["civil", "criminal", "tax", "trade"]))
    (tmp_path / "notes.txt").write_text("not a task")
    return tmp_path


def test_jsonl_tasks_sample_correct_episodes(task_dir):
    fam = make_family(FamilySpec(name="jsonl", path=str(task_dir), ways=2, shots=2, query=3))
    corpus = fam.corpus
    assert len(corpus.texts) == 6 * 13 and len(corpus.names) == 13
    assert [t.file for t in fam.splits["test"]] == [str(task_dir / "d_law.jsonl")]
    assert [t.file for t in fam.splits["val"]] == [str(task_dir / "c_food.jsonl")]
    for split, prefix in (("train", "ab"), ("val", "c"), ("test", "d")):
        allowed = {c for t in fam.splits[split] for c in t.classes}
        for i in range(10):
            ep = fam.sample(TaskKey(1, split, 0, i), 2, 3)
            check_episode(ep, corpus, allowed, 2, 2, 3)
            x = np.concatenate([ep.support_x, ep.query_x])
            files = {corpus.texts[j][0] for j in x}
            assert len(files) == 1 and files <= set(prefix)  # one task file per episode
            for c in (0, 1):  # a label's texts all carry it
                labels = {corpus.texts[j].split()[1] for j in x[np.concatenate(
                    [ep.support_y, ep.query_y]) == c]}
                assert len(labels) == 1
    a = fam.sample(TaskKey(1, "test", 0, 0), 2, 3)
    np.testing.assert_array_equal(a.query_x, fam.sample(TaskKey(1, "test", 0, 0), 2, 3).query_x)
    assert not all(np.array_equal(a.query_x, fam.sample(TaskKey(1, "test", 0, i), 2, 3).query_x)
                   for i in range(1, 5))
    x, y = fam.pretrain_batch(np.random.default_rng(0), 500)
    assert fam.pretrain_outputs == 6 and set(y.tolist()) == set(range(6))
    assert {corpus.texts[j][0] for j in x} == {"a", "b"}
    # 0 (int) and "goal" (str) are both labels; names say which file they belong to
    assert "b_digits.jsonl:0" in corpus.names and "a_sports.jsonl:goal" in corpus.names


GOOD = rows("z", ["x", "y"])
BAD_FILES = {
    "not JSON": ([GOOD[0], "{text: no quotes}"], 2, "not JSON"),
    "not an object": ([GOOD[0], ["a", "b"]], 2, "expected an object"),
    "missing label": ([GOOD[0], GOOD[1], {"text": "t"}], 3, "expected an object"),
    "missing text": ([{"label": "x"}], 1, "expected an object"),
    "text not a string": ([GOOD[0], {"text": 7, "label": "x"}], 2, "text must be"),
    "empty text": ([GOOD[0], {"text": "  ", "label": "x"}], 2, "text must be"),
    "label a float": ([GOOD[0], {"text": "t", "label": 1.5}], 2, "label must be"),
    "label a bool": ([{"text": "t", "label": True}], 1, "label must be"),
    "one label": (rows("z", ["x"], 8), 8, "at least 2 labels"),
    "too few examples": (GOOD + [{"text": "new", "label": "rare"}], 13, "label 'rare' has 1"),
    "too few labels for ways": (GOOD, 12, "2 labels, fewer than ways = 3"),
    # a file saved as Latin-1: "café" with é as the one byte 0xe9
    "not UTF-8": ([GOOD[0], b'{"text": "caf\xe9", "label": "x"}'], 2,
                  "not UTF-8 text: byte 0xe9 is byte 14 of the line"),
    # JSON's escape for half of an emoji's UTF-16 pair
    "unpaired surrogate": ([GOOD[0], '{"text": "half an emoji \\ud83d", "label": "x"}'], 2,
                           "text holds an unpaired surrogate escape (\\ud83d), not text"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_jsonl_is_one_config_error_naming_file_and_line(task_dir, case):
    lines, line_no, message = BAD_FILES[case]
    bad = task_dir / "e_bad.jsonl"
    bad.write_bytes(b"".join((r if isinstance(r, bytes) else
                              (r if isinstance(r, str) else json.dumps(r)).encode()) + b"\n"
                             for r in lines))
    ways = 3 if case == "too few labels for ways" else 2
    with pytest.raises(ConfigError) as err:
        make_family(FamilySpec(name="jsonl", path=str(task_dir), ways=ways, shots=2, query=3))
    text = str(err.value)
    assert len(err.value.errors) == 1 and "\n" not in text
    assert text.startswith(f"{bad}:{line_no}: "), text
    assert message in text


def test_a_byte_order_mark_and_crlf_line_ends_read_as_plain_jsonl():
    """Files saved as "UTF-8 with BOM" and with Windows line ends hold the same task."""
    plain = "".join(json.dumps(r) + "\n" for r in GOOD).encode()
    read = []
    for content in (plain, codecs.BOM_UTF8 + plain.replace(b"\n", b"\r\n")):
        texts, labels, names = [], [], []
        task = read_task("t.jsonl", content, "t.jsonl", texts, labels, names)
        read.append((task, texts, labels, names))
    assert read[0] == read[1]
    task, texts, labels, names = read[0]
    assert texts == [r["text"] for r in GOOD] and names == ["t.jsonl:x", "t.jsonl:y"]
    assert labels == [0, 1] * 6 and task.last_line == 12


def test_jsonl_directory_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"^family\.path: .* is not a directory$"):
        make_family(FamilySpec(name="jsonl", path=str(tmp_path / "missing")))
    write_task(tmp_path / "a.jsonl", GOOD)
    write_task(tmp_path / "b.jsonl", GOOD)
    with pytest.raises(ConfigError, match=r"^family\.path: .* holds 2 \*\.jsonl task files"):
        make_family(FamilySpec(name="jsonl", path=str(tmp_path)))


def test_jsonl_evaluation_with_more_shots_than_a_label_has_names_the_line(task_dir):
    fam = make_family(FamilySpec(name="jsonl", path=str(task_dir), ways=2, shots=2, query=3))
    with pytest.raises(ConfigError, match=re.escape(f"{task_dir / 'd_law.jsonl'}:1: label")):
        fam.sample(TaskKey(0, "test", 0, 0), 5, 3)


@pytest.mark.parametrize("family,message", [
    ("{name: jsonl}", "family.path: jsonl needs path"),
    ("{name: wordnet, path: /tmp}", "family.path: path applies to jsonl only, not wordnet"),
    ("{name: fortunes, ways: 7}", "family.ways: fortunes's smallest split has 6 classes"),
    ("{name: wordnet, shots: 30, query: 13}", "exceed the 42 examples of wordnet's smallest"),
])
def test_spec_checks_for_text_families(family, message):
    with pytest.raises(ConfigError) as err:
        parse_spec(f"family: {family}\nalgorithm: {{name: maml}}\n")
    assert message in str(err.value)


@pytest.mark.parametrize("source", [*SHIPPED, "digits", "jsonl"])
def test_support_set_does_not_depend_on_the_query_size(source, task_dir):
    """Evaluating with more query examples must score the same tasks: the support set
    and the first query examples are those of the smaller draw."""
    fam = make_family(FamilySpec(name=source, ways=2, shots=2, query=3,
                                 path=str(task_dir) if source == "jsonl" else None))
    for i in range(5):
        key = TaskKey(0, "test", 100, i)
        small, large = fam.sample(key, 2, 1), fam.sample(key, 2, 4)
        np.testing.assert_array_equal(small.support_x, large.support_x)
        np.testing.assert_array_equal(small.support_y, large.support_y)
        # per class, the one query example is the first of the four
        np.testing.assert_array_equal(small.query_x, large.query_x[::4])
