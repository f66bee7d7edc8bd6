"""The shared real datasets through the CLI: import, validate, preprocess, statistics (slow)."""

import pytest
import yaml

from mmrec import cli
from mmrec.stages import read_stats
from mmrec.config import load_config
from tests.conftest import REPO, SHARED

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/datasets not present")]


def test_real_datasets_import_validate_and_report(tmp_path, capsys):
    spec = yaml.safe_load((REPO / "configs" / "real.yaml").read_text())
    spec["root"] = str(REPO)
    spec["artifacts"] = str(tmp_path / "artifacts")
    spec["preset"] = str(REPO / "configs" / "presets" / "cpu.yaml")  # relative to real.yaml, not to the copy
    cfg_path = tmp_path / "real.yaml"
    cfg_path.write_text(yaml.safe_dump(spec))
    # the data stages only: training on the real domains is the README's 24-minute experiment
    for stage in ("raw_catalog", "validated_catalog"):
        assert cli.main([stage, "--config", str(cfg_path), "-q"]) == 0
    cfg = load_config(cfg_path)
    amazon, ml = read_stats(cfg, "amazon_instrument"), read_stats(cfg, "movielens_100k")
    assert (amazon["users"], amazon["items"], amazon["interactions"]) == (10000, 33921, 83828)
    assert amazon["share_text"] == 1.0 and amazon["share_image"] == 0.0
    assert (ml["users"], ml["items"], ml["interactions"]) == (943, 1682, 100000)
    assert ml["image_only"] == 0 and ml["text_only"] == 62  # posters for 96.3%; the rest are text items
    assert round(ml["share_image"], 3) == 0.963
    # preprocess.repeats: drop_all removes 3377 repeated interactions (of 2353 users); 560 users then
    # have fewer than min_seq_len = 5 and go (with repeats kept, 411 test targets sat in the history)
    assert amazon["preprocessing"]["repeats_dropped"] == 3377 and amazon["preprocessing"]["short_users_dropped"] == 560
    assert amazon["after_preprocess"] == {"users": 9440, "items": 19894, "interactions": 75619, "dropped_users": 560}
    # every MovieLens user has >= 20 ratings: none is dropped, each keeps up to L+3 = 23
    assert ml["after_preprocess"] == {"users": 943, "items": 1412, "interactions": 21522, "dropped_users": 0}
    assert "amazon_instrument" in capsys.readouterr().out
