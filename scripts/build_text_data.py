"""Build metapeft_dist/data/text_tasks.json.gz (and its NOTICE) from Debian packages.

    apt-get install -y wordnet-base fortunes
    python scripts/build_text_data.py

Sources:

* WordNet 3.0 (``wordnet-base``): every synset of data.{noun,verb,adj,adv} becomes the text
  ``"<first lemma>: <gloss>"`` labelled with its lexicographer file, one of 45 supersense
  categories such as noun.animal or verb.motion.
* ``fortunes`` / ``fortunes-min``: every entry of a topic file (entries end at a line
  holding only ``%``) labelled with the file's name (art, computers, food, law, ...).
  The offensive set (``off/``, package fortunes-off) is never read; ``ethnic`` (jokes
  about nationalities) and ``ascii-art`` (pictures, which whitespace normalization
  destroys) are left out as well.

Every text has its whitespace collapsed and is cut to at most MAX_CHARS characters at a
word boundary; empty texts and duplicates within a category are dropped; a category keeps
at most MAX_PER_CATEGORY texts, a sample drawn with a seed derived from its name, kept in
source order; a category left with fewer than MIN_PER_CATEGORY texts is dropped (the meta
section lists it). The output is a pure function of the package contents: JSON with sorted
keys, gzip with no file name and mtime 0.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = ROOT / "metapeft_dist" / "data"
OUT = DATA_DIR / "text_tasks.json.gz"
NOTICE = DATA_DIR / "NOTICE-text-data.md"

WORDNET_DIR = Path("/usr/share/wordnet")
FORTUNES_DIR = Path("/usr/share/games/fortunes")
WORDNET_COPYRIGHT = Path("/usr/share/doc/wordnet-base/copyright")
FORTUNES_COPYRIGHT = Path("/usr/share/doc/fortunes/copyright")
FORTUNES_MIN_COPYRIGHT = Path("/usr/share/doc/fortunes-min/copyright")
PACKAGES = ("wordnet-base", "fortunes", "fortunes-min")

MAX_PER_CATEGORY = 150
MIN_PER_CATEGORY = 40
MAX_CHARS = 300
SEED = 0

# WordNet 3.0's lexnames file: lexicographer file number -> supersense. Debian's
# wordnet-base does not ship lexnames, so this fixed list is used when it is absent.
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal",
    "noun.artifact", "noun.attribute", "noun.body", "noun.cognition", "noun.communication",
    "noun.event", "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive",
    "noun.object", "noun.person", "noun.phenomenon", "noun.plant", "noun.possession",
    "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state",
    "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition",
    "verb.communication", "verb.competition", "verb.consumption", "verb.contact",
    "verb.creation", "verb.emotion", "verb.motion", "verb.perception", "verb.possession",
    "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)
EXCLUDED_TOPICS = {
    "ascii-art": "pictures drawn in characters; whitespace normalization destroys them",
    "ethnic": "jokes about nationalities; left out with the offensive set",
}


def normalize(text: str) -> str:
    """Whitespace collapsed, cut to MAX_CHARS characters at a word boundary."""
    text = " ".join(text.split())
    if len(text) > MAX_CHARS:
        cut = text[: MAX_CHARS + 1]
        text = cut.rsplit(" ", 1)[0] if " " in cut else text[:MAX_CHARS]
    return text


def lexnames(wordnet_dir: Path) -> tuple[str, ...]:
    path = wordnet_dir / "lexnames"
    if not path.exists():
        return LEXNAMES
    names = {}
    for line in path.read_text().splitlines():
        if line.strip():
            number, name = line.split()[:2]
            names[int(number)] = name
    return tuple(names[i] for i in sorted(names))


def wordnet_texts(wordnet_dir: Path) -> dict[str, list[str]]:
    names = lexnames(wordnet_dir)
    texts: dict[str, list[str]] = {}
    for pos in ("noun", "verb", "adj", "adv"):
        with open(wordnet_dir / f"data.{pos}", encoding="utf-8") as f:
            for line in f:
                if line.startswith("  "):  # the licence header
                    continue
                head, _, gloss = line.partition(" | ")
                fields = head.split()
                lemma = re.sub(r"\(\w+\)$", "", fields[4]).replace("_", " ")
                texts.setdefault(names[int(fields[1])], []).append(f"{lemma}: {gloss}")
    return texts


def fortune_texts(fortunes_dir: Path) -> dict[str, list[str]]:
    texts: dict[str, list[str]] = {}
    for path in sorted(fortunes_dir.iterdir()):
        if (not path.is_file() or path.is_symlink() or path.suffix in (".dat", ".u8")
                or path.name in EXCLUDED_TOPICS):
            continue
        entries, lines = [], []
        for line in path.read_text(encoding="utf-8").splitlines():
            if line == "%":
                entries.append("\n".join(lines))
                lines = []
            else:
                lines.append(line)
        entries.append("\n".join(lines))
        texts[path.name] = entries
    return texts


def curate(source: str, raw: dict[str, list[str]]) -> tuple[dict[str, list[str]], dict[str, int]]:
    """(kept categories, {dropped category: texts it had})."""
    kept, dropped = {}, {}
    for name in sorted(raw):
        texts = list(dict.fromkeys(t for t in map(normalize, raw[name]) if t))
        if len(texts) < MIN_PER_CATEGORY:
            dropped[name] = len(texts)
            continue
        if len(texts) > MAX_PER_CATEGORY:
            # A str seed is hashed with SHA-512: the same sample on every Python >= 3.2.
            chosen = random.Random(f"{SEED}/{source}/{name}").sample(range(len(texts)),
                                                                     MAX_PER_CATEGORY)
            texts = [texts[i] for i in sorted(chosen)]
        kept[name] = texts
    return kept, dropped


def package_version(name: str) -> str:
    return subprocess.run(["dpkg-query", "-W", "-f=${Version}", name], check=True,
                          capture_output=True, text=True).stdout.strip()


def build(wordnet_dir: Path = WORDNET_DIR, fortunes_dir: Path = FORTUNES_DIR) -> bytes:
    """The gzip-compressed JSON, byte for byte."""
    wordnet, wordnet_dropped = curate("wordnet", wordnet_texts(wordnet_dir))
    fortunes, fortunes_dropped = curate("fortunes", fortune_texts(fortunes_dir))
    data = {
        "wordnet": wordnet,
        "fortunes": fortunes,
        "meta": {
            "packages": {name: package_version(name) for name in PACKAGES},
            "caps": {"max_per_category": MAX_PER_CATEGORY, "min_per_category": MIN_PER_CATEGORY,
                     "max_chars": MAX_CHARS, "seed": SEED},
            "dropped": {"wordnet": wordnet_dropped, "fortunes": fortunes_dropped},
            "excluded": {"fortunes": EXCLUDED_TOPICS},
            "texts": {"wordnet": "'<first lemma>: <gloss>' of a synset, labelled with its "
                                 "lexicographer file (supersense)",
                      "fortunes": "one fortune entry, labelled with its topic file"},
            "builder": "scripts/build_text_data.py",
        },
    }
    payload = json.dumps(data, sort_keys=True, ensure_ascii=False, indent=0).encode("utf-8")
    return gzip.compress(payload, compresslevel=9, mtime=0)


def notice() -> str:
    def quote(path: Path) -> str:
        return "\n".join(f"    {line}".rstrip() for line in path.read_text().splitlines())

    same = FORTUNES_COPYRIGHT.read_bytes() == FORTUNES_MIN_COPYRIGHT.read_bytes()
    fortunes_note = ("The copyright file of fortunes-min, whose `fortunes`, `literature` and\n"
                     "`riddles` files are also used, is the same file." if same else "")
    return f"""# Text data: sources and licences

`text_tasks.json.gz` holds short texts for the `wordnet` and `fortunes` task families of
`metapeft_dist/tasks/text.py`. `scripts/build_text_data.py` builds it from the Debian
packages {", ".join(f"`{p}`" for p in PACKAGES)} (their versions are in the file's
`meta.packages`):

- `wordnet`: for each WordNet 3.0 synset, its first lemma and its gloss
  (`"<lemma>: <gloss>"`), labelled with its lexicographer file, a supersense category
  such as `noun.animal` or `verb.motion`;
- `fortunes`: entries of the fortune topic files (art, computers, food, law, ...),
  labelled with the topic. The offensive set is not used; `ethnic` and `ascii-art` are
  left out.

Whitespace is collapsed, texts are cut to {MAX_CHARS} characters, duplicates and empty
texts are dropped, each category keeps at most {MAX_PER_CATEGORY} texts (a seeded sample),
and categories with fewer than {MIN_PER_CATEGORY} texts are dropped (listed in
`meta.dropped`). The texts are excerpts of the databases below, distributed under their
licences, quoted here as the packages state them.

## WordNet 3.0 (`/usr/share/doc/wordnet-base/copyright`)

{quote(WORDNET_COPYRIGHT)}

## fortunes (`/usr/share/doc/fortunes/copyright`)

{fortunes_note}

{quote(FORTUNES_COPYRIGHT)}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--notice", type=Path, default=NOTICE)
    parser.add_argument("--wordnet-dir", type=Path, default=WORDNET_DIR)
    parser.add_argument("--fortunes-dir", type=Path, default=FORTUNES_DIR)
    args = parser.parse_args(argv)
    for path in (args.wordnet_dir, args.fortunes_dir):
        if not path.is_dir():
            print(f"{path} is missing: apt-get install -y wordnet-base fortunes",
                  file=sys.stderr)
            return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(build(args.wordnet_dir, args.fortunes_dir))
    args.notice.write_text(notice())
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes) and {args.notice}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
