"""DVC: data.dvc matches the regenerated demo data; `dvc repro` of the project's dvc.yaml works on
a clean copy, a second run has nothing to do, and a library change re-runs the stages using it."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mmrec import stages
from mmrec.config import load_config
from mmrec.data.synthetic import generate_demo
from tests.conftest import REPO

DVC = str(Path(sys.executable).with_name("dvc"))
ENV = {**os.environ, "DVC_NO_ANALYTICS": "1"}


def dvc(cwd: Path, *args: str) -> str:
    res = subprocess.run([DVC, *args], cwd=cwd, env=ENV, capture_output=True, text=True)
    assert res.returncode == 0, f"dvc {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}"
    return res.stdout + res.stderr


def test_dvc_yaml_stages_are_the_library_stages_per_domain():
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert list(spec["stages"]) == list(stages.STAGES)
    cfg = load_config(REPO / "configs" / "demo.yaml")
    targets = [d.name for d in cfg.targets]
    for name, stage in spec["stages"].items():
        if name in stages.CROSS_DOMAIN:
            assert f"-m mmrec {name} --config configs/demo.yaml" in stage["cmd"]
            assert stage["outs"] == [f"${{artifacts}}/{name}"]
            # the pretrained model depends on exactly the source domains' features
            feats = sorted(d.rsplit("/", 1)[1] for d in stage["deps"] if d.startswith("${artifacts}/item_features/"))
            assert feats == sorted(d.name for d in cfg.sources)
        elif name in stages.TARGET_ONLY:
            assert stage["foreach"] == targets
            assert f"-m mmrec {name} --config configs/demo.yaml --domain ${{item}}" in stage["do"]["cmd"]
        else:
            assert stage["foreach"] == "${domains}"
            assert f"-m mmrec {name} --config configs/demo.yaml --domain ${{key}}" in stage["do"]["cmd"]
            assert stage["do"]["outs"] == [f"${{artifacts}}/{name}/${{key}}"]
        deps = stage.get("deps") or stage["do"]["deps"]
        assert "mmrec/stages.py" in deps
    assert cfg.artifacts == REPO / "artifacts" / "demo"


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    """The demo data generated from configs/demo.yaml into a fresh folder."""
    root = tmp_path_factory.mktemp("proj")
    cfg = load_config(REPO / "configs" / "demo.yaml")
    generate_demo(cfg.demo, root / "data" / "demo", progress=False)
    return root


def test_regenerated_demo_data_matches_data_dvc(demo_data, tmp_path):
    shutil.copytree(demo_data / "data", tmp_path / "data")
    dvc(tmp_path, "init", "--no-scm", "-q")
    dvc(tmp_path, "add", "-q", "data")
    ours = yaml.safe_load((tmp_path / "data.dvc").read_text())["outs"][0]
    committed = yaml.safe_load((REPO / "data.dvc").read_text())["outs"][0]
    assert (ours["md5"], ours["nfiles"], ours["size"]) == (committed["md5"], committed["nfiles"], committed["size"])


def test_dvc_repro_on_a_clean_copy(demo_data):
    proj = demo_data
    for name in ("dvc.yaml", "configs", "mmrec"):
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, proj / name)
    (proj / ".venv").symlink_to(Path(sys.executable).parents[1])  # the stage cmd calls .venv/bin/python
    dvc(proj, "init", "--no-scm", "-q")
    # the catalog stages (the model stages train real encoders: the slow pipeline test runs those)
    out = dvc(proj, "repro", "validated_catalog")
    cfg = load_config(proj / "configs" / "demo.yaml")
    for d in cfg.domains:
        assert f"Running stage 'validated_catalog@{d.name}'" in out
        assert (proj / "artifacts" / "demo" / "validated_catalog" / d.name / "splits.parquet").is_file()
    # identical outputs to the committed lock file: the pipeline is deterministic
    ours = yaml.safe_load((proj / "dvc.lock").read_text())["stages"]
    committed = yaml.safe_load((REPO / "dvc.lock").read_text())["stages"]
    assert {k: v["outs"] for k, v in ours.items()} == {k: committed[k]["outs"] for k in ours}

    again = dvc(proj, "repro", "validated_catalog")
    assert "Running stage" not in again and "up to date" in again

    with open(proj / "mmrec" / "data" / "preprocess.py", "a") as fh:
        fh.write("\n# a code change\n")
    status = dvc(proj, "status", "validated_catalog")
    assert "validated_catalog@films" in status and "raw_catalog@films" not in status


def test_committed_lock_matches_the_code():
    """dvc.lock records the md5 of every library file a stage depends on; a stale lock means
    someone changed the code without re-running `dvc repro` (a fresh clone would re-run it)."""
    import hashlib

    lock = yaml.safe_load((REPO / "dvc.lock").read_text())["stages"]
    stale = set()
    for stage in lock.values():
        for dep in stage["deps"]:
            path = REPO / dep["path"]
            if path.is_file() and dep["path"].endswith(".py"):
                if hashlib.md5(path.read_bytes()).hexdigest() != dep["md5"]:
                    stale.add(dep["path"])
    assert not stale, f"dvc.lock is stale for {sorted(stale)}: run `make demo` (or `dvc repro`) and commit dvc.lock"
