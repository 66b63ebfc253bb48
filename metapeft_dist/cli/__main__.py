"""``python -m metapeft_dist.cli``: the ``metapeft`` command."""

from metapeft_dist.cli import main

main(prog_name="metapeft")
