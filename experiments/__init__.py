"""``make experiments``: the experiment cells of the results page, run through the library stages.

A *cell* is one configuration derived from a base pipeline config (``configs/*.yaml``) by a few
YAML overrides, run for one seed with the same stage functions the CLI, ``dvc.yaml`` and Dagster
call (``mmrec.stages``), in its own artifacts folder, and summarised in one JSON record. A cell
whose record exists is skipped, so the command resumes where it stopped. ``experiments.report``
turns the records into ``docs/RESULTS.md`` and the PNG figures under ``docs/results/``.

- ``experiments.cells``: which cells exist and how each derives its config.
- ``experiments.run``: runs cells (shared data stages, shared training runs keyed by config and
  inputs), writes records; ``python -m experiments`` is its command line.
- ``experiments.report``: records -> tables, paired intervals over users, figures.
"""
