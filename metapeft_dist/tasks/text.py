"""N-way K-shot text classification: WordNet supersenses, fortune topics, users' JSONL tasks.

An episode's inputs are int32 indices into its family's :class:`TextCorpus` (``x`` has
shape ``(n,)``): a text model builds its token table from ``family.corpus`` once, so
episodes stay tiny and a task is still a pure function of its key.

Shipped families (``metapeft_dist/data/text_tasks.json.gz``, built by
``scripts/build_text_data.py`` from Debian's wordnet-base and fortunes packages; sources
and licences in ``data/NOTICE-text-data.md``):

* ``wordnet``: ``"<lemma>: <gloss>"`` of a WordNet 3.0 synset, labelled with its
  supersense (lexicographer file, e.g. noun.animal, verb.motion): 45 categories of 42-150
  texts.
* ``fortunes``: a fortune entry labelled with its topic file (art, computers, food, law,
  ...): 38 topics of 52-150 texts.

Categories are split disjointly, so meta-test categories are never seen in meta-training:
ranked by the SHA-256 of their name, the first 60% (rounded) are meta-train, the next 15%
meta-val and the rest meta-test. WordNet: 27 / 7 / 11 categories, meta-val
noun.{communication, event, group, person, relation, time}, verb.perception; meta-test
adj.all, noun.{Tops, artifact, attribute, object, possession},
verb.{cognition, competition, consumption, possession, weather}. Fortunes: 23 / 6 / 9
topics, meta-val computers, drugs, literature, medicine, miscellaneous, riddles; meta-test
art, cookie, disclaimer, food, linux, people, perl, tao, zippy.

Users' tasks (``jsonl``, ``family.path`` a directory): each ``*.jsonl`` file is one task,
its lines ``{"text": str, "label": str or int}`` in UTF-8 (a leading byte-order mark is
skipped); an episode picks one file of its split, ``ways`` of that file's labels and
``shots + query`` texts of each. Files are split by name: sorted, the last 25% (at least
one) are meta-test, the 15% (at least one) before them meta-val, the rest meta-train;
name the files you want held out so they sort last. Mistakes in a file raise
:class:`ConfigError` naming ``file:line``.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from metapeft_dist.config import ConfigError
from metapeft_dist.tasks.base import Episode, TaskKey, distinct
from metapeft_dist.tasks.catalog import FAMILIES, SPLITS

DATA_FILE = Path(__file__).resolve().parents[1] / "data" / "text_tasks.json.gz"
SPLIT_FRACTIONS = {"train": 0.60, "val": 0.15}  # test: the rest


@dataclass(frozen=True)
class TextCorpus:
    """Every text of a family; ``labels[i]`` indexes ``names`` (int32, shape (n,))."""

    texts: tuple[str, ...]
    labels: np.ndarray
    names: tuple[str, ...]

    def members(self) -> list[np.ndarray]:
        """Indices of each category's texts, in corpus order."""
        order = np.argsort(self.labels, kind="stable")
        bounds = np.cumsum(np.bincount(self.labels, minlength=len(self.names)))[:-1]
        return [m.astype(np.int32) for m in np.split(order, bounds)]


@lru_cache(maxsize=1)
def load_shipped() -> dict:
    with gzip.open(DATA_FILE, "rt", encoding="utf-8") as f:
        return json.load(f)


@lru_cache(maxsize=None)
def shipped_corpus(source: str) -> TextCorpus:
    """The ``wordnet`` or ``fortunes`` corpus, categories in sorted order."""
    categories = load_shipped()[source]
    names = tuple(sorted(categories))
    texts = tuple(t for name in names for t in categories[name])
    labels = np.repeat(np.arange(len(names), dtype=np.int32),
                       [len(categories[name]) for name in names])
    return TextCorpus(texts, labels, names)


def split_counts(n: int) -> dict[str, int]:
    train = int(SPLIT_FRACTIONS["train"] * n + 0.5)
    val = int(SPLIT_FRACTIONS["val"] * n + 0.5)
    return {"train": train, "val": val, "test": n - train - val}


def split_categories(names: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """{split: category ids}: ranked by SHA-256 of the name, cut 60 / 15 / 25%."""
    ranked = sorted(range(len(names)), key=lambda i: hashlib.sha256(names[i].encode()).digest())
    counts, out, start = split_counts(len(names)), {}, 0
    for split in SPLITS:
        out[split] = tuple(sorted(ranked[start:start + counts[split]]))
        start += counts[split]
    return out


def draw(rng: np.random.Generator, classes: tuple[int, ...], members: list[np.ndarray],
         ways: int, shots: int, query: int) -> Episode:
    """``ways`` of ``classes``, ``shots + query`` distinct texts of each; labels by draw order.
    The support set does not depend on ``query`` (see ``distinct``)."""
    chosen = rng.choice(len(classes), size=ways, replace=False)
    picked = [distinct(rng, members[classes[c]], shots + query) for c in chosen]
    labels = np.arange(ways, dtype=np.int32)
    return Episode(
        np.concatenate([p[:shots] for p in picked]), np.repeat(labels, shots),
        np.concatenate([p[shots:] for p in picked]), np.repeat(labels, query),
    )


class CorpusFamily:
    """A family whose tasks are ``ways`` categories of one split of ``corpus``."""

    files = None

    def __init__(self, corpus: TextCorpus, splits: dict[str, tuple[int, ...]], ways: int):
        self.corpus = corpus
        self.splits = splits
        self.ways = ways
        self.members = corpus.members()
        self.pretrain_outputs = len(splits["train"])

    def sample(self, key: TaskKey, shots: int, query: int) -> Episode:
        return draw(key.rng(), self.splits[key.split], self.members, self.ways, shots, query)

    def pretrain_batch(self, rng: np.random.Generator, size: int):
        """Texts of the meta-train categories, labelled by position in ``splits["train"]``."""
        pool = self.splits["train"]
        labels = rng.integers(len(pool), size=size)
        x = np.array([self.members[pool[c]][rng.integers(len(self.members[pool[c]]))]
                      for c in labels], dtype=np.int32)
        return x, labels.astype(np.int32)


class WordNet(CorpusFamily):
    info = FAMILIES["wordnet"]

    def __init__(self, ways: int):
        corpus = shipped_corpus("wordnet")
        super().__init__(corpus, split_categories(corpus.names), ways)


class Fortunes(CorpusFamily):
    info = FAMILIES["fortunes"]

    def __init__(self, ways: int):
        corpus = shipped_corpus("fortunes")
        super().__init__(corpus, split_categories(corpus.names), ways)


@dataclass(frozen=True)
class JsonlTask:
    file: str  # as the user will look for it: the directory joined with the name
    classes: tuple[int, ...]  # corpus category ids of this file's labels
    first_lines: tuple[int, ...]  # line where each label first appears
    last_line: int


def _fail(file: str, line: int, message: str) -> ConfigError:
    return ConfigError([(f"{file}:{line}", message)])


def _surrogate(value: str) -> int | None:
    """A UTF-16 surrogate in ``value``, else None: JSON's escapes can spell half of a
    pair (json.loads joins whole pairs into one character), which is no text, and a
    tokenizer would refuse it later, far from its line."""
    return next((ord(c) for c in value if 0xD800 <= ord(c) <= 0xDFFF), None)


def read_task(name: str, content: bytes, shown: str, texts: list[str], labels: list[int],
              names: list[str]) -> JsonlTask:
    """Appends the texts of one task file (its ``name`` and ``content``) to the corpus
    lists; its labels become new categories."""
    local: dict[tuple[type, object], int] = {}
    first_lines, line_no = [], 0
    if content.startswith(codecs.BOM_UTF8):  # as editors that save "UTF-8 with BOM" do
        content = content[len(codecs.BOM_UTF8):]
    for line_no, raw in enumerate(content.splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _fail(shown, line_no, f"not UTF-8 text: byte {raw[e.start]:#04x} is byte "
                                        f"{e.start + 1} of the line") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise _fail(shown, line_no, f"not JSON: {e.msg}") from None
        if not isinstance(row, dict) or "text" not in row or "label" not in row:
            raise _fail(shown, line_no, 'expected an object {"text": ..., "label": ...}')
        text, label = row["text"], row["label"]
        if not isinstance(text, str) or not text.strip():
            raise _fail(shown, line_no, f"text must be a non-empty string, got {text!r}")
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise _fail(shown, line_no, f"label must be a string or an integer, got "
                                        f"{label!r}")
        for field, value in (("text", text), ("label", label)):
            if isinstance(value, str) and (half := _surrogate(value)) is not None:
                raise _fail(shown, line_no, f"{field} holds an unpaired surrogate escape "
                                            f"(\\u{half:04x}), not text")
        if (type(label), label) not in local:
            local[(type(label), label)] = len(names)
            names.append(f"{name}:{label}")
            first_lines.append(line_no)
        texts.append(text)
        labels.append(local[(type(label), label)])
    if len(local) < 2:
        raise _fail(shown, line_no, f"a task needs at least 2 labels, this file has "
                                    f"{len(local)}")
    return JsonlTask(shown, tuple(local.values()), tuple(first_lines), line_no)


def read_jsonl_files(path: str) -> dict[str, bytes]:
    """The task files of a ``jsonl`` family, read once: every ``*.jsonl`` file of
    ``path`` by name, in name order (their order makes the splits)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ConfigError([("family.path", f"{path} is not a directory")])
    files = sorted(root.glob("*.jsonl"))
    if len(files) < len(SPLITS):
        raise ConfigError([("family.path", f"{path} holds {len(files)} *.jsonl task files; "
                                           f"meta-train, meta-val and meta-test need one each")])
    return {file.name: file.read_bytes() for file in files}


def write_task_files(files: dict[str, bytes], directory: Path) -> Path:
    """``files`` (name -> content) written into ``directory`` (created); returns it."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (directory / Path(name).name).write_bytes(content)
    return directory


def load_jsonl_dir(path: str, files: dict[str, bytes] | None = None
                   ) -> tuple[TextCorpus, list[JsonlTask], dict[str, bytes]]:
    """Every ``*.jsonl`` file of ``path`` in name order, as one corpus, its tasks and the
    files as read. Given ``files`` (name -> content, as read elsewhere: a worker gets the
    driver's), those are parsed instead and ``path`` only names them in errors."""
    if files is None:
        files = read_jsonl_files(path)
    files = dict(sorted(files.items()))
    texts: list[str] = []
    labels: list[int] = []
    names: list[str] = []
    tasks = [read_task(name, content, str(Path(path) / name), texts, labels, names)
             for name, content in files.items()]
    corpus = TextCorpus(tuple(texts), np.array(labels, dtype=np.int32), tuple(names))
    return corpus, tasks, files


def split_files(n: int) -> dict[str, range]:
    """Positions of the name-sorted files in each split: the last ones are held out."""
    test = max(1, int(0.25 * n + 0.5))
    val = max(1, int(SPLIT_FRACTIONS["val"] * n + 0.5))
    return {"train": range(0, n - val - test), "val": range(n - val - test, n - test),
            "test": range(n - test, n)}


class JsonlTasks:
    """Users' tasks: one ``*.jsonl`` file per task, labels local to their file. ``files``:
    the task files as read (the driver sends them to its workers; ``Job.files``)."""

    info = FAMILIES["jsonl"]

    def __init__(self, path: str, ways: int, shots: int, query: int,
                 files: dict[str, bytes] | None = None):
        self.corpus, self.tasks, self.files = load_jsonl_dir(path, files)
        self.ways = ways
        self.members = self.corpus.members()
        self.splits = {s: tuple(self.tasks[i] for i in r)
                       for s, r in split_files(len(self.tasks)).items()}
        self.train_classes = tuple(c for t in self.splits["train"] for c in t.classes)
        self.pretrain_outputs = len(self.train_classes)
        for task in self.tasks:
            self.check(task, shots, query)

    def check(self, task: JsonlTask, shots: int, query: int) -> None:
        if len(task.classes) < self.ways:
            raise _fail(task.file, task.last_line, f"{len(task.classes)} labels, fewer than "
                                                   f"ways = {self.ways}")
        for c, line in zip(task.classes, task.first_lines, strict=True):
            have = len(self.members[c])
            if have < shots + query:
                label = self.corpus.names[c].split(":", 1)[1]
                raise _fail(task.file, line, f"label {label!r} has {have} examples, fewer than "
                                             f"shots + query = {shots + query}")

    def sample(self, key: TaskKey, shots: int, query: int) -> Episode:
        rng = key.rng()
        pool = self.splits[key.split]
        task = pool[rng.integers(len(pool))]
        self.check(task, shots, query)  # evaluation may ask for more shots than training
        return draw(rng, task.classes, self.members, self.ways, shots, query)

    def pretrain_batch(self, rng: np.random.Generator, size: int):
        """Texts of the meta-train files over all their (file, label) classes."""
        labels = rng.integers(len(self.train_classes), size=size)
        x = np.array([self.members[self.train_classes[c]][
            rng.integers(len(self.members[self.train_classes[c]]))] for c in labels],
            dtype=np.int32)
        return x, labels.astype(np.int32)
