"""python -m metapeft_dist.config > docs/job-spec.md"""

from metapeft_dist.config.reference import reference

print(reference())
