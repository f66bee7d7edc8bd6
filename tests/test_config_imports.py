"""Config as a leaf: the arrows between the config modules point one way.

``mmrec.configbase`` (generic parsing) imports no mmrec module; each component defines its own
section with it; ``mmrec.config`` assembles the sections. So no module that ``mmrec.config``
imports, at module level or inside a function, imports ``mmrec.config`` back: the one-time cycle
``config -> models.recommender -> config`` cannot return. Read from the source (``ast``), so a
lazy import inside a function counts as much as one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

LEAF, PIPELINE = "mmrec.configbase", "mmrec.config"


def _name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in (REPO / "mmrec").rglob("*.py")}


def _with_parents(name: str) -> set[str]:
    """``a.b.c`` and the packages importing it runs first (``a``, ``a.b``)."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & set(MODULES)


def _imports(name: str, module_level_only: bool = False) -> set[str]:
    """The mmrec modules ``name`` imports (everywhere, or only in the code that runs on import;
    ``if TYPE_CHECKING:`` blocks count only in the first case)."""
    out: set[str] = set()
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if module_level_only:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                return
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                node = ast.Module(body=node.orelse, type_ignores=[])
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.update(_with_parents(alias.name))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            out.update(_with_parents(base))
            out.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES)  # from pkg import mod
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(MODULES[name].read_text(encoding="utf-8"), filename=str(MODULES[name])))
    return out - {name}


GRAPH = {name: _imports(name) for name in MODULES}


def _path(start: str, goal: str) -> list[str] | None:
    """An import chain ``start -> ... -> goal`` (breadth first), or None."""
    prev: dict[str, str | None] = {start: None}
    todo = [start]
    while todo:
        here = todo.pop(0)
        for nxt in sorted(GRAPH[here]):
            if nxt == goal:
                chain = [goal, here]
                while prev[chain[-1]] is not None:
                    chain.append(prev[chain[-1]])
                return chain[::-1]
            if nxt not in prev:
                prev[nxt] = here
                todo.append(nxt)
    return None


def test_the_graph_sees_real_imports():
    assert "mmrec.data.preprocess" in GRAPH[PIPELINE] and "mmrec.stages" in GRAPH["mmrec.cli"]
    assert "mmrec.models.recommender" in GRAPH[PIPELINE]  # lazy, inside PipelineConfig.model
    assert "mmrec.models.recommender" not in _imports(PIPELINE, module_level_only=True)


def test_configbase_is_a_leaf():
    assert LEAF in MODULES, "generic config parsing (from_dict, ConfigError) lives in mmrec/configbase.py"
    assert GRAPH[LEAF] == set()


def test_no_import_cycle_through_the_config_modules():
    cycles = {name: chain for name in (LEAF, PIPELINE) if name in MODULES and (chain := _path(name, name))}
    assert cycles == {}, "\n".join(" -> ".join(chain) for chain in cycles.values())


def test_components_own_their_sections_and_never_import_the_pipeline_config():
    """Whatever ``mmrec.config`` uses, the owners of its sections included, takes the generic parser
    from the leaf and never imports ``mmrec.config``: only the layers above it (stages, CLI) do."""
    below = {m for m in MODULES if m != PIPELINE and _path(PIPELINE, m)}
    assert {m for m in below if PIPELINE in GRAPH[m]} == set()
    owners = {"PreprocessConfig": "mmrec.data.preprocess", "ValidationConfig": "mmrec.data.validation",
              "DemoConfig": "mmrec.data.synthetic", "ModelConfig": "mmrec.models.recommender",
              "TrainConfig": "mmrec.training", "TransferConfig": "mmrec.transfer"}
    defined = {cls: [m for m in MODULES if f"\nclass {cls}:" in MODULES[m].read_text(encoding="utf-8")] for cls in owners}
    assert defined == {cls: [m] for cls, m in owners.items()}
    assert set(owners.values()) <= below


def test_the_pipeline_config_reaches_model_and_demo_sections_only_on_first_use():
    """Loading a config imports neither torch (the model package) nor the demo generator."""
    eager = _imports(PIPELINE, module_level_only=True)
    lazy_only = ("mmrec.models", "mmrec.data.synthetic", "mmrec.training", "mmrec.transfer", "mmrec.encoders")
    assert sorted(m for m in eager if m.startswith(lazy_only)) == []


def test_one_copy_of_the_generic_parser():
    defined = {
        name: sorted(n.name for n in ast.parse(path.read_text(encoding="utf-8")).body
                     if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name in ("ConfigError", "from_dict"))
        for name, path in MODULES.items()
    }
    assert {k: v for k, v in defined.items() if v} == {LEAF: ["ConfigError", "from_dict"]}
