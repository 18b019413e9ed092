"""Stage report: papermill runs reports/templates/results.ipynb → reports/results.{ipynb,md,html}, reports/README.md,
reports/figures/."""

from vldistill.cli import stage_args
from vldistill.config import TASKS, flatten
from vldistill.report.render import render
from vldistill.train.tracking import Tracker


def main() -> None:
    _, params = stage_args(__doc__)
    with Tracker("report", flatten({"report": params.report, "tasks": params.tasks, "ablation": params.ablation})) as tracker:
        _render(params)
        tracker.log_artifact("reports/results.md")
    print("report: reports/results.md (executed notebook: reports/results.ipynb)")


def _recipe(params, variant: str) -> dict[str, str]:
    recipe = params.variant(variant)
    return {"student": params.student_kind(variant), "knowledge": "+".join(recipe.knowledge), "layers": recipe.layers,
            "stages": "+".join(recipe.stages)}


def _render(params) -> None:
    study = params.ablation
    render("reports/templates/results.ipynb", "reports/results.ipynb", {
        "metrics_dir": "metrics", "plots_dir": "plots", "out_md": "reports/results.md",
        "out_html": "reports/results.html", "out_readme": "reports/README.md",
        "figures_dir": "reports/figures", "attention_dir": "reports/attention", "tasks": list(params.tasks),
        "task_variants": {task: params.task_variants(task) for task in params.tasks},
        "fusion_students": sorted(v for v in params.variants if params.student_kind(v) == "fusion"),
        "data_tasks": [t for t in ("pretrain", *TASKS) if getattr(params.data, t)],
        "data_figures_dir": "reports/data",
        "ablation_task": study.task, "ablation_tables": {k: list(v) for k, v in study.tables.items()},
        "recipes": {v: _recipe(params, v) for v in params.variants},
        "seeds": list(params.seeds),
        "decimals": params.report.decimals,
    })


if __name__ == "__main__":
    main()
