"""The ``metapeft`` command: parse, call one ``api`` function, print.

Imports neither mlx nor ray at load time, so ``metapeft --help`` is instant. Exit codes:
0 success, 1 the job failed (or was stopped), 2 usage, spec, address or cluster error.
Every read command takes ``--json``.
"""

from __future__ import annotations

import click

from metapeft_dist.cli.cluster import cluster, list_jobs, logs, status, stop, submit
from metapeft_dist.cli.local import adapt, embed, evaluate, report, run, validate


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="metapeft-dist")
def main() -> None:
    """Meta-learn LoRA initializations over task distributions, with MLX."""


for _command in (run, validate, report, adapt, evaluate, embed, submit, status, logs, stop,
                 list_jobs, cluster):
    main.add_command(_command)

__all__ = ["main"]
