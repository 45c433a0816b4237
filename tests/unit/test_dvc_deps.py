"""dvc.yaml's code deps cover what each stage runs, so `dvc status` cannot call a stale output fresh.

Each stage's module (``python -m pipeline.stages.<name>``) is followed through its imports within
the project (read from the source with ``ast``, nothing is imported); every project file it
reaches must be a dep of that stage, itself or through a folder. The package stage also bundles
the service into the Bento, so the service's imports and the bentofile's ``include`` count too.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

PROJECT = ("pipeline", "serving")


def _module_file(name: str) -> Path | None:
    base = REPO.joinpath(*name.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.exists():
            return candidate
    return None


def _imported_names(path: Path, module: str) -> set[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return names


def import_closure(module: str) -> set[Path]:
    """Project files that importing ``module`` executes (packages' ``__init__`` included)."""
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        parts = todo.pop().split(".")
        if parts[0] not in PROJECT:
            continue
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            path = _module_file(name)
            if path is not None and name not in seen:
                seen[name] = path
                todo.extend(_imported_names(path, name))
    return set(seen.values())


def _docstring_only(path: Path) -> bool:
    body = ast.parse(path.read_text()).body
    return path.name == "__init__.py" and all(
        isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in body)


def _stages() -> dict[str, dict]:
    text = (REPO / "dvc.yaml").read_text()
    paths = yaml.safe_load(text)["vars"][0]["paths"]
    resolved = re.sub(r"\$\{paths\.(\w+)\}", lambda m: paths[m.group(1)], text)
    return yaml.safe_load(resolved)["stages"]


STAGES = _stages()


def _module(stage: dict) -> str:
    match = re.search(r"python -m (\S+)", stage["cmd"])
    assert match, f"cmd does not run a module: {stage['cmd']}"
    return match.group(1)


def _bento_includes() -> set[Path]:
    bentofile = yaml.safe_load((REPO / "serving" / "bentofile.yaml").read_text())
    return {p for pattern in bentofile["include"] for p in REPO.glob(pattern) if p.suffix == ".py"}


def _covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(REPO)
    return any(rel == Path(dep) or Path(dep) in rel.parents for dep in deps)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_deps_cover_every_module_it_imports(name: str) -> None:
    stage = STAGES[name]
    needed = import_closure(_module(stage))
    if name == "package":  # the Bento runs the service and bundles what the bentofile includes
        needed |= import_closure("serving.service") | _bento_includes()
    missing = sorted(str(p.relative_to(REPO)) for p in needed
                     if not _docstring_only(p) and not _covered(p, stage["deps"]))
    assert not missing, f"dvc.yaml stage {name!r} runs {missing} but does not list them in deps"


def test_every_stage_module_is_a_stage_of_dvc_yaml() -> None:
    modules = {_module(stage) for stage in STAGES.values()}
    on_disk = {f"pipeline.stages.{p.stem}" for p in (REPO / "pipeline" / "stages").glob("*.py")
               if p.name != "__init__.py"}
    assert on_disk == modules
    for name, stage in STAGES.items():
        assert _module(stage) == f"pipeline.stages.{name}", "a stage's module bears the stage's name"


def test_bento_bundles_the_service_and_its_imports_only() -> None:
    needed = {p for p in import_closure("serving.service")}
    assert _bento_includes() == needed | set((REPO / "serving").glob("*.py"))


def test_the_closure_follows_imports() -> None:
    closure = {str(p.relative_to(REPO)) for p in import_closure("pipeline.stages.evaluate")}
    assert {"pipeline/models/inference.py", "pipeline/contracts.py", "pipeline/features.py",
            "pipeline/stats.py"} <= closure
    assert not any(p.startswith("pipeline/training/") for p in closure)  # evaluate needs no Lightning
