"""DVC: data.dvc matches the regenerated demo data; `dvc repro` of the project's dvc.yaml works on
a clean copy, a second run has nothing to do, and a library change re-runs the stages using it;
every mmrec module a stage imports is one of its deps."""

import ast
import json
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

    # a module only the model stages import leaves the catalog stages up to date...
    with open(proj / "mmrec" / "data" / "sequences.py", "a") as fh:
        fh.write("\n# a code change\n")
    assert "up to date" in dvc(proj, "status", "--with-deps", "validated_catalog")
    # ...one they import (stages.py imports preprocess.py, so raw_catalog too) re-runs them
    with open(proj / "mmrec" / "data" / "preprocess.py", "a") as fh:
        fh.write("\n# a code change\n")
    status = dvc(proj, "status", "--with-deps", "validated_catalog")
    assert "validated_catalog@films" in status and "raw_catalog@films" in status


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


# -- every module a stage imports is a dep of the stage ------------------------------------------
# `dvc.yaml`'s deps are kept by hand; they drifted (item_features omitted data/catalog.py,
# data/images.py and models/fusion.py, so a change there did not re-run it). The import graph below
# is read from the source: module-level imports are followed transitively (they always run); an
# import inside a function counts when that function can run for the stage: the stage function
# itself, `load_config`, any function or method whose name is referenced by code that can run, and
# the dunder methods of a class so referenced (by name, so it over-approximates: `model.train()`
# reaches `PipelineConfig.train`).
# `test_static_imports_cover_what_the_catalog_stages_import` checks it against a real run.

def _module_file(name: str) -> Path:
    p = REPO.joinpath(*name.split("."))
    return p / "__init__.py" if p.is_dir() else p.with_suffix(".py")


class _Module:
    def __init__(self, name: str):
        self.name, self.file = name, _module_file(name)
        self.tree = ast.parse(self.file.read_text(encoding="utf-8"))
        self.package = name if self.file.name == "__init__.py" else name.rpartition(".")[0]
        self.defs: dict[str, list[ast.AST]] = {}  # function or class name -> function bodies it holds
        for node in ast.walk(self.tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self.defs.setdefault(node.name, []).append(node)
            elif isinstance(node, ast.ClassDef):  # using a class runs its dunders (__init__, __post_init__, ...)
                self.defs.setdefault(node.name, []).extend(
                    n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name.startswith("__"))

    def code_is_empty(self) -> bool:
        body = self.tree.body
        return not body or (len(body) == 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant))

    def imports(self, node: ast.AST, module_level: bool) -> set[str]:
        """mmrec modules imported by ``node`` (module_level: the code that runs on import)."""
        out: set[str] = set()

        def visit(n):
            if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test):
                return [visit(c) for c in n.orelse]
            if module_level and isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                return None
            if isinstance(n, ast.Import):
                out.update(a.name for a in n.names if a.name.split(".")[0] == "mmrec")
            elif isinstance(n, ast.ImportFrom):
                base = n.module or ""
                if n.level:
                    parts = self.package.split(".")
                    base = ".".join(parts[: len(parts) - n.level + 1] + ([n.module] if n.module else []))
                if base.split(".")[0] == "mmrec":
                    out.add(base)  # `from mmrec import stages` imports a submodule:
                    out.update(f"{base}.{a.name}" for a in n.names if _module_file(f"{base}.{a.name}").is_file())
            for c in ast.iter_child_nodes(n):
                visit(c)

        for c in (node.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else [node]):
            visit(c)
        return out


def _referenced(node: ast.AST) -> set[str]:
    return {n.id if isinstance(n, ast.Name) else n.attr for n in ast.walk(node) if isinstance(n, (ast.Name, ast.Attribute))}


def stage_imports(stage: str) -> set[str]:
    """The mmrec modules `python -m mmrec <stage>` can import (a superset of what it does import)."""
    mods: dict[str, _Module] = {}

    def load(name: str) -> None:
        if name in mods:
            return
        mods[name] = mod = _Module(name)
        parts = name.split(".")
        for i in range(1, len(parts)):  # importing a.b.c runs a and a.b first
            load(".".join(parts[:i]))
        for m in mod.imports(mod.tree, module_level=True):
            load(m)

    load("mmrec.__main__")
    cli, config = mods["mmrec.cli"], mods["mmrec.config"]
    for m in cli.imports(cli.defs["main"][0], module_level=False):  # the CLI's own lazy imports
        load(m)
    other_stages = set(stages.STAGES) - {stage}
    todo = [("mmrec.stages", mods["mmrec.stages"].defs[stage][0]), ("mmrec.config", config.defs["load_config"][0])]
    done: set[int] = set()
    refs: set[str] = set()
    while todo:
        while todo:
            name, fn = todo.pop()
            done.add(id(fn))
            for m in mods[name].imports(fn, module_level=False):
                load(m)
            refs |= _referenced(fn)
        for name, mod in list(mods.items()):
            for def_name, fns in mod.defs.items():
                if def_name in refs and not (name == "mmrec.stages" and def_name in other_stages):
                    todo += [(name, fn) for fn in fns if id(fn) not in done]
    return set(mods)


def _stage_deps(spec: dict) -> dict[str, list[str]]:
    return {name: (stage.get("deps") or stage["do"]["deps"]) for name, stage in spec["stages"].items()}


def test_every_module_a_stage_imports_is_in_its_deps():
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())
    problems = []
    for name, deps in _stage_deps(spec).items():
        listed = [d.rstrip("/") for d in deps if d.split("/")[0] == "mmrec"]
        files = {str(_module_file(m).relative_to(REPO)) for m in stage_imports(name) if not _Module(m).code_is_empty()}
        missing = sorted(f for f in files if not any(f == d or f.startswith(d + "/") for d in listed))
        unused = sorted(d for d in listed if not any(f == d or f.startswith(d + "/") for f in files))
        if missing:
            problems.append(f"{name}: imports {missing} but does not list them in deps")
        if unused:
            problems.append(f"{name}: lists {unused} in deps but never imports them")
    assert not problems, "dvc.yaml deps out of step with the imports:\n" + "\n".join(problems)


TRACE = """
import json, runpy, sys
sys.argv = ["mmrec", *sys.argv[1:]]
try:
    runpy.run_module("mmrec", run_name="__main__")
except SystemExit as exc:
    assert exc.code == 0, exc.code
finally:
    print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] == "mmrec")))
"""


def test_static_imports_cover_what_the_catalog_stages_import(tmp_path):
    """The graph above against a real run of the two catalog stages (the model stages train)."""
    from tests.conftest import write_tabular

    write_tabular(tmp_path / "raw" / "shop")
    spec = {"root": ".", "artifacts": "art", "preprocess": {"min_seq_len": 3, "max_seq_len": 2},
            "domains": {"shop": {"source": {"format": "tabular", "path": "raw/shop", "options": {"text": ["title"]}}}},
            "demo": {"domains": ["x"]}}  # load_config imports the demo generator's config for this section
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(spec))
    for stage in ("raw_catalog", "validated_catalog"):
        res = subprocess.run([sys.executable, "-c", TRACE, stage, "--config", str(tmp_path / "p.yaml"), "-q"],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        ran = set(json.loads(res.stdout.strip().splitlines()[-1]))
        assert {"mmrec.cli", "mmrec.data.validation", "mmrec.data.synthetic"} <= ran
        assert ran <= stage_imports(stage), sorted(ran - stage_imports(stage))
