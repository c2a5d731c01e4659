"""``main()`` of a step module: ``python -m regression.ridge_step --dataset nsd`` runs that step alone.

Step modules take their entry point from here, not from :mod:`pipeline.cli`: importing a step
(which the runner does for every check) then loads no command line, and the CLI, which imports
the runner, is never imported back by the steps it runs.
"""
from __future__ import annotations


def step_main(step: str, argv: list[str] | None = None) -> int:
    """Parse the shared flags plus ``--dataset`` and ``--force``, run ``step`` for the chosen subjects."""
    from pipeline.cli import step_main as run_one_step

    return run_one_step(step, argv)
