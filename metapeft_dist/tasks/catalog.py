"""Static facts about the task families, needed to validate a job spec without loading data.

Kept free of numpy / mlx imports so that ``config`` (and therefore the CLI) stays cheap.
``tests/tasks`` checks every number here against the real data.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FamilyInfo:
    name: str
    kind: str  # "regression" | "classification"
    input_shape: tuple[int, ...]  # of one example; images are (H, W, C)
    image: bool
    fixed_ways: int | None  # classification families whose tasks always have this many classes
    classes_per_split: dict[str, int] | None  # None: tasks are drawn from a continuous family
    min_class_size: int | None  # examples in the smallest class; None: unbounded (synthetic)
    description: str


FAMILIES: dict[str, FamilyInfo] = {
    "sinusoid": FamilyInfo(
        name="sinusoid",
        kind="regression",
        input_shape=(1,),
        image=False,
        fixed_ways=None,
        classes_per_split=None,
        min_class_size=None,
        description="y = A sin(x - phase), A ~ U[0.1, 5], phase ~ U[0, pi], x ~ U[-5, 5] "
        "(Finn et al. 2017)",
    ),
    "gaussian": FamilyInfo(
        name="gaussian",
        kind="classification",
        input_shape=(8,),
        image=False,
        fixed_ways=2,
        classes_per_split=None,
        min_class_size=None,
        description="two Gaussian classes whose means, covariances and separation vary by task",
    ),
    "digits": FamilyInfo(
        name="digits",
        kind="classification",
        input_shape=(8, 8, 1),
        image=True,
        fixed_ways=None,
        # (digit, rotation) classes; split by digit so meta-test digits are never seen.
        classes_per_split={"train": 16, "val": 8, "test": 10},
        min_class_size=174,
        description="scikit-learn's 8x8 digits; each (digit, 0/90/180/270 rotation) is a class "
        "(0, 1 and 8 only at 0/90: their 180-degree turns look the same); "
        "digits 0-4 meta-train, 5-6 meta-val, 7-9 meta-test",
    ),
    "wordnet": FamilyInfo(
        name="wordnet",
        kind="classification",
        input_shape=(),  # x is an index into the family's text corpus
        image=False,
        fixed_ways=None,
        classes_per_split={"train": 27, "val": 7, "test": 11},
        min_class_size=42,
        description="WordNet 3.0 glosses ('<lemma>: <gloss>') labelled with their supersense "
        "(45 lexicographer files such as noun.animal, verb.motion); categories split "
        "60/15/25% by name hash",
    ),
    "fortunes": FamilyInfo(
        name="fortunes",
        kind="classification",
        input_shape=(),
        image=False,
        fixed_ways=None,
        classes_per_split={"train": 23, "val": 6, "test": 9},
        min_class_size=52,
        description="Debian fortune entries labelled with their topic (art, computers, food, "
        "law, ...: 38 topics); topics split 60/15/25% by name hash",
    ),
    "jsonl": FamilyInfo(
        name="jsonl",
        kind="classification",
        input_shape=(),
        image=False,
        fixed_ways=None,
        classes_per_split=None,  # known only once the user's directory is read
        min_class_size=None,
        description="your own tasks: a directory of *.jsonl files, one task per file, lines "
        "{\"text\": ..., \"label\": ...}; files sorted by name, the last 25% meta-test and "
        "the 15% before them meta-val",
    ),
}

SPLITS = ("train", "val", "test")
# Families whose examples are texts (x: indices into the family's corpus).
TEXT_FAMILIES = ("wordnet", "fortunes", "jsonl")
