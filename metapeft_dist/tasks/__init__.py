"""Task families: seeded episode samplers with disjoint meta-train / val / test splits.

Importing this package is cheap; a family's data loads when :func:`make_family` builds it.
"""

from __future__ import annotations


def make_family(spec):
    """The sampler for a :class:`metapeft_dist.config.FamilySpec`."""
    if spec.name == "sinusoid":
        from metapeft_dist.tasks.sinusoid import Sinusoid

        return Sinusoid()
    if spec.name == "gaussian":
        from metapeft_dist.tasks.gaussian import Gaussian

        return Gaussian()
    if spec.name == "digits":
        from metapeft_dist.tasks.digits import Digits

        return Digits(spec.ways, spec.augment)
    raise ValueError(f"unknown task family {spec.name!r}")
