"""Task families: seeded episode samplers with disjoint meta-train / val / test splits.

Importing this package is cheap; a family's data loads when :func:`make_family` builds it.
"""

from __future__ import annotations


def make_family(spec, files: dict[str, bytes] | None = None):
    """The sampler for a :class:`metapeft_dist.config.FamilySpec`. ``files``: a jsonl
    family's task files as read by another process (the driver's ``Job.files``), used
    instead of reading ``spec.path``."""
    if spec.name == "sinusoid":
        from metapeft_dist.tasks.sinusoid import Sinusoid

        return Sinusoid()
    if spec.name == "gaussian":
        from metapeft_dist.tasks.gaussian import Gaussian

        return Gaussian()
    if spec.name == "digits":
        from metapeft_dist.tasks.digits import Digits

        return Digits(spec.ways, spec.augment)
    if spec.name in ("wordnet", "fortunes"):
        from metapeft_dist.tasks.text import Fortunes, WordNet

        return (WordNet if spec.name == "wordnet" else Fortunes)(spec.ways)
    if spec.name == "jsonl":
        from metapeft_dist.tasks.text import JsonlTasks

        return JsonlTasks(spec.path, spec.ways, spec.shots, spec.query, files)
    raise ValueError(f"unknown task family {spec.name!r}")
