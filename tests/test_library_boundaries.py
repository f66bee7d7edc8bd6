"""`mmrec/` is a library: it runs without Dagster, DVC, MLflow or a web framework in the process."""

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

FORBIDDEN = ("dagster", "dvc", "mlflow", "fastapi", "flask", "uvicorn")


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_library_source_imports_no_orchestration_or_serving_framework():
    offenders = {
        str(p.relative_to(REPO)): sorted(_imported_modules(p) & set(FORBIDDEN))
        for p in (REPO / "mmrec").rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_cli_and_stages_import_without_heavy_frameworks():
    # importing the CLI (what `mmrec --help` does) must not pull in GX, torch or the orchestration stack
    code = (
        "import sys, mmrec.cli, mmrec.stages, mmrec.config;"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {FORBIDDEN + ('great_expectations', 'torch')!r}];"
        "print(','.join(sorted(bad)))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def _first_party_imports(folder: str) -> dict[str, set[str]]:
    return {str(p.relative_to(REPO)): _imported_modules(p) & {"mmrec", "orchestration", "deploy"}
            for p in (REPO / folder).rglob("*.py")}


def test_first_party_arrows_point_one_way():
    """mmrec imports neither layer; deploy/ uses the library (and MLflow), never orchestration/:
    the served model's code lives in the library or in deploy/."""
    assert {k: v for k, v in _first_party_imports("mmrec").items() if v - {"mmrec"}} == {}
    assert {k: v for k, v in _first_party_imports("deploy").items() if "orchestration" in v} == {}
    assert any("mmrec" in v for v in _first_party_imports("deploy").values())  # the check sees real imports


def test_deploy_imports_no_orchestration_framework():
    offenders = {k: sorted(_imported_modules(REPO / k) & {"dagster", "dvc", "great_expectations"})
                 for k in _first_party_imports("deploy")}
    assert {k: v for k, v in offenders.items() if v} == {}
