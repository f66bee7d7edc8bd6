"""The CLI: one command per stage, clear errors with exit status 2, stats table."""

import json
import subprocess
import sys

import polars as pl
import yaml

from mmrec import cli, stages
from mmrec.config import load_config
from tests.conftest import REPO, edit_csv
from tests.test_stages import _config


def test_one_command_per_stage():
    parser = cli.build_parser()
    commands = set(parser._subparsers._group_actions[0].choices)  # noqa: SLF001
    for stage in stages.STAGES:
        assert stage in commands and stage.replace("_", "-") in commands
    assert {"demo_data", "run", "stats"} <= commands


def test_help_runs_as_a_program():
    out = subprocess.run([sys.executable, "-m", "mmrec", "--help"], cwd=REPO, capture_output=True, text=True, check=True)
    for stage in stages.STAGES:
        assert stage in out.stdout


def test_catalog_stages_then_stats(tmp_path, capsys):
    cfg = _config(tmp_path)
    assert cli.main(["raw_catalog", "--config", str(cfg), "-q"]) == 0
    assert cli.main(["validated-catalog", "--config", str(cfg), "-q"]) == 0
    assert cli.main(["stats", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out.splitlines()
    header, row = out[-3], out[-1]
    assert header.split()[:4] == ["domain", "users", "items", "interactions"]
    assert row.split()[:4] == ["shop", "5", "12", "30"]
    assert "kept" in header


def test_bad_input_exits_2_naming_the_file_and_row(tmp_path, capsys):
    cfg = _config(tmp_path)
    edit_csv(tmp_path / "raw" / "shop" / "items.csv", lambda rows: [r[:1] + r[2:] for r in rows])  # drop 'title'
    assert cli.main(["raw_catalog", "--config", str(cfg), "-q"]) == 2
    err = capsys.readouterr().err
    assert "items.csv" in err and "title" in err


def test_unknown_domain_and_missing_config(tmp_path, capsys):
    cfg = _config(tmp_path)
    assert cli.main(["raw_catalog", "--config", str(cfg), "--domain", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert cli.main(["stats", "--config", str(tmp_path / "absent.yaml")]) == 2
    assert "absent.yaml" in capsys.readouterr().err


def test_demo_data_command(tmp_path, capsys):
    cfg = {"root": ".", "demo": {"path": "data/demo", "seed": 3, "domains": ["a", "b"], "n_users": 12,
                                 "n_items": 16, "min_seq_len": 6, "max_seq_len": 8},
           "domains": {"a": {"source": {"format": "tabular", "path": "data/demo/a"}}}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli.main(["demo_data", "--config", str(path), "-q"]) == 0
    assert (tmp_path / "data" / "demo" / "a" / "items.csv").is_file()
    assert (tmp_path / "data" / "demo" / "b" / "interactions.csv").is_file()
    assert "a: 12 users, 16 items" in capsys.readouterr().out


def test_seed_runs_a_stage_into_its_own_artifacts_folder(tmp_path, capsys):
    cfg = load_config(_config(tmp_path))
    assert cli.main(["raw_catalog", "--config", str(cfg.config_path), "-q", "--seed", "4"]) == 0
    assert (cfg.with_seed(4).artifact_path("raw_catalog", "shop")).is_dir()
    assert cfg.with_seed(4).artifacts.name.endswith("-seed4") and not cfg.artifacts.exists()


def test_metrics_over_several_seeds_prints_mean_and_std(tmp_path, capsys):
    from tests.test_stages import _result

    cfg = load_config(_config(tmp_path))
    for seed, hr in ((0, 0.2), (1, 0.3)):
        res = _result(hr, 0.1, domain="shop")
        out = cfg.with_seed(seed).artifact_path("evaluation", "shop")
        out.mkdir(parents=True)
        (out / stages.METRICS).write_text(json.dumps(res))
        ranks = list(range(1, 101))  # finetuned ahead of id for every user: id ranks 20 below
        pl.DataFrame({"user_idx": list(range(100)), "finetuned": ranks, "id": [r + 20 for r in ranks]}).write_parquet(
            out / stages.RANKS)
    assert cli.main(["metrics", "--config", str(cfg.config_path), "--seed", "0", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "| finetuned | 25.00 ± 7.07 | 10.00 ± 0.00 |" in out and "seeds [0, 1] (n=2)" in out
    assert "- finetuned - id: NDCG@10" in out and "over 100 users x 2 seeds: ahead" in out
    assert cli.main(["metrics", "--config", str(cfg.config_path), "--seed", "1"]) == 0  # one seed: that run's table
    assert "| finetuned | 30.00 | 10.00 |" in capsys.readouterr().out
    assert cli.main(["metrics", "--config", str(cfg.config_path), "--seed", "0", "--seed", "2"]) == 2  # seed 2 never ran
    assert "seed2" in capsys.readouterr().err


def test_device_option_and_compute_threads(tmp_path, capsys):
    import torch

    cfg = _config(tmp_path)
    assert cli.main(["raw_catalog", "--config", str(cfg), "-q", "--device", "gpu"]) == 2
    err = capsys.readouterr().err
    assert "--device" in err and "auto | cpu | cuda | cuda:N" in err and "'gpu'" in err
    if not torch.cuda.is_available():
        assert cli.main(["raw_catalog", "--config", str(cfg), "-q", "--device", "cuda:0"]) == 2
        assert "torch sees no CUDA device" in capsys.readouterr().err
    assert cli.main(["raw_catalog", "--config", str(cfg), "-q", "--device", "auto"]) == 0

    spec = yaml.safe_load(cfg.read_text())
    cfg.write_text(yaml.safe_dump({**spec, "compute": {"threads": 2}}))
    before = torch.get_num_threads()
    try:
        assert cli.main(["raw_catalog", "--config", str(cfg), "-q"]) == 0
        assert torch.get_num_threads() == 2
        assert cli.main(["raw_catalog", "--config", str(cfg), "-q", "--threads", "1"]) == 0  # the option wins
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
