"""One name per artifact everywhere: the library stages, the CLI commands, the dvc.yaml stages and
the Dagster asset graph (plus ``served_model``, the registration only Dagster does)."""

import yaml

from mmrec import cli, stages
from tests.conftest import REPO

NOT_STAGES = {"demo_data", "run", "stats", "metrics", "compare"}
"""CLI commands that are not pipeline stages."""


def _cli_stage_commands() -> list[str]:
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    return [a.dest for a in sub._choices_actions if a.dest not in NOT_STAGES]


def test_library_cli_dvc_and_asset_graph_name_the_same_stages():
    from orchestration.definitions import defs

    library = list(stages.STAGES)
    dvc = list(yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"])
    graph = defs.get_repository_def().asset_graph
    assets = [k.to_user_string() for k in graph.toposorted_asset_keys]  # a chain: one order
    assert _cli_stage_commands() == library
    assert dvc == library
    assert assets == [*library, "served_model"]
    assert list(stages.STAGE_FUNCTIONS) == library
