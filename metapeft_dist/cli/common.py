"""What every ``metapeft`` command shares: exit codes, the one-line error, JSON output,
the ``--set`` option. Imports neither mlx nor ray."""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Any

import click

from metapeft_dist.config import ConfigError

EXIT_FAILED, EXIT_USAGE = 1, 2


def fail_usage(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(EXIT_USAGE)


@contextlib.contextmanager
def one_line_errors():
    """Bad input and unusable clusters become one ``error:`` line and exit status 2."""
    from metapeft_dist.remote import RemoteError
    from metapeft_dist.runtime.jobs import JobsError
    from metapeft_dist.runtime.launcher import ClusterConfigError

    try:
        yield
    except (ConfigError, RemoteError, JobsError, ClusterConfigError) as err:
        fail_usage(str(err).splitlines()[0] if str(err) else type(err).__name__)


def print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=1))


def overrides_option(func):
    return click.option(
        "--set", "overrides", multiple=True, metavar="KEY=VALUE",
        help="Override a spec field, e.g. --set algorithm.iterations=100 (repeatable).",
    )(func)
