"""Job specs: frozen dataclasses, loaded from YAML and validated once, at the edge.

Every field carries a help string, which is also the source of the spec reference
(docs/job-spec.md). Loading collects every problem it finds, each with the path of the
field (``inner.lr: must be > 0, got -0.1``), and raises one :class:`ConfigError`.
After loading, only these dataclasses travel through the code.

  errors.py     ConfigError and the check helpers
  schema.py     the dataclasses
  loader.py     YAML / plain data -> JobSpec
  reference.py  the Markdown reference page

This package imports neither mlx nor ray.
"""

from metapeft_dist.config.errors import ConfigError
from metapeft_dist.config.loader import from_dict, load_spec, parse_spec, section_from_dict
from metapeft_dist.config.reference import reference
from metapeft_dist.config.schema import (
    ALGORITHMS, BASELINES, AlgorithmSpec, CheckpointSpec, CostSpec, EvalSpec, FamilySpec,
    InnerSpec, JobSpec, LoraSpec, MamlppSpec, MetaSgdSpec, ModelSpec, OuterSpec,
    PretrainSpec, ReptileSpec, RunSpec, RuntimeSpec)

__all__ = ["ConfigError", "from_dict", "load_spec", "parse_spec", "reference",
           "section_from_dict", "ALGORITHMS", "BASELINES", "AlgorithmSpec", "CheckpointSpec",
           "CostSpec", "EvalSpec", "FamilySpec", "InnerSpec", "JobSpec", "LoraSpec",
           "MamlppSpec", "MetaSgdSpec", "ModelSpec", "OuterSpec", "PretrainSpec",
           "ReptileSpec", "RunSpec", "RuntimeSpec"]
