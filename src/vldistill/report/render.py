"""Render the report: papermill executes each template notebook, which writes the markdown tables and figures."""

from __future__ import annotations

from pathlib import Path

from vldistill.io import atomic_path


def render(template: str | Path, output: str | Path, parameters: dict) -> Path:
    """Execute ``template`` with ``parameters`` into ``output`` (an executed notebook, written atomically)."""
    import papermill as pm

    output = Path(output)
    with atomic_path(output.with_suffix(".ipynb")) as tmp:
        pm.execute_notebook(str(template), str(tmp), parameters=parameters, kernel_name="python3",
                            progress_bar=False, cwd=str(Path.cwd()))
    return output
