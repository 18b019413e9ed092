"""dvc.yaml declares, for every stage, each module of ``src/vldistill`` that the stage's script can run: a change to
code a stage imports (at the top of a module or inside a function) must rerun that stage, or ``dvc repro`` would
keep outputs that the current code would not produce.

The closure is static (every ``import vldistill…`` / ``from vldistill… import …`` in a module, followed
transitively), so it over-approximates what one run executes, as a dependency list should. A notebook a stage
declares (the report template, which papermill executes) counts as code: its code cells' imports are followed too. Package
``__init__.py`` files are left out: they hold a docstring only (checked below)."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def module_file(name: str) -> Path | None:
    """``vldistill.a.b`` → its source file (a module or a package's ``__init__.py``), or None if there is none."""
    base = SRC.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def source_of(path: Path) -> str:
    """Python source of a module, or of a notebook's code cells (IPython magics and shell lines left out)."""
    if path.suffix != ".ipynb":
        return path.read_text()
    cells = [c["source"] for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    lines = ["".join(c) if isinstance(c, list) else c for c in cells]
    return "\n".join(l for cell in lines for l in cell.splitlines() if not l.lstrip().startswith(("%", "!")))


def imported_modules(path: Path) -> set[str]:
    """Every ``vldistill`` module that ``path`` (a module or a notebook) imports anywhere in its body (``from pkg
    import sub`` counts ``sub`` when it is a module of ``pkg``)."""
    names = set()
    for node in ast.walk(ast.parse(source_of(path), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names if alias.name.split(".")[0] == "vldistill"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "vldistill":
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names
                      if module_file(f"{node.module}.{alias.name}") is not None}
    return names


def code_closure(*scripts: Path) -> set[str]:
    """Repository-relative paths of the non-``__init__`` ``src/vldistill`` files that ``scripts`` can run."""
    seen: set[Path] = set()
    todo = list(scripts)
    while todo:
        for name in imported_modules(todo.pop()):
            parts = name.split(".")
            for depth in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__ too
                path = module_file(".".join(parts[:depth]))
                if path is not None and path not in seen:
                    seen.add(path)
                    todo.append(path)
    return {str(p.relative_to(ROOT)) for p in seen if p.name != "__init__.py"}


def stage_definitions() -> dict[str, dict]:
    """dvc.yaml's stages as written (a ``foreach`` stage's ``do`` body; a ``matrix`` stage's own body)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: body.get("do", body) for name, body in stages.items()}


def covered(path: str, deps: list[str]) -> bool:
    return any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps)


@pytest.mark.parametrize("stage", sorted(stage_definitions()))
def test_stage_declares_every_module_it_can_run(stage):
    body = stage_definitions()[stage]
    script = re.search(r"python (stages/\S+\.py)", body["cmd"]).group(1)
    deps = [d for d in body.get("deps", []) if "${" not in d]
    assert script in deps, f"{stage}: its script {script} is not among its deps"
    notebooks = [ROOT / d for d in deps if d.endswith(".ipynb")]
    missing = sorted(p for p in code_closure(ROOT / script, *notebooks) if not covered(p, deps))
    assert not missing, f"dvc.yaml stage {stage} runs code it does not declare in deps: {missing}"


def test_package_init_files_hold_no_code():
    for init in (SRC / "vldistill").rglob("__init__.py"):
        body = ast.parse(init.read_text()).body
        code = [n for n in body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))
                and not (isinstance(n, ast.Assign) and [t.id for t in n.targets] == ["__version__"])]
        assert not code, f"{init.relative_to(ROOT)} holds code; declare it where it is imported"


def test_the_report_notebook_is_followed():
    """The report template imports library modules the stage script does not (``vldistill.report.findings``): the
    closure of the report stage must hold them, so editing one reruns the report."""
    notebook = ROOT / "reports/templates/results.ipynb"
    assert "src/vldistill/report/findings.py" in code_closure(notebook)
    assert "src/vldistill/report/findings.py" not in code_closure(ROOT / "stages/report.py")
