"""Stage report: papermill runs reports/templates/results.ipynb → reports/results.ipynb, reports/results.md, figures."""

from vldistill.cli import stage_args
from vldistill.config import flatten
from vldistill.report.render import render
from vldistill.train.tracking import Tracker


def main() -> None:
    _, params = stage_args(__doc__)
    with Tracker("report", flatten({"report": params.report, "tasks": params.tasks})) as tracker:
        _render(params)
        tracker.log_artifact("reports/results.md")
    print("report: reports/results.md (executed notebook: reports/results.ipynb)")


def _render(params) -> None:
    render("reports/templates/results.ipynb", "reports/results.ipynb", {
        "metrics_dir": "metrics", "plots_dir": "plots", "out_md": "reports/results.md",
        "figures_dir": "reports/figures", "tasks": list(params.tasks),
        "task_variants": {task: params.task_variants(task) for task in params.tasks},
        "fusion_students": sorted(v for v in params.variants if params.student_kind(v) == "fusion"),
        "data_tasks": [t for t in type(params.data).model_fields if t != "scene" and getattr(params.data, t)],
        "data_figures_dir": "reports/data",
        "decimals": params.report.decimals,
    })


if __name__ == "__main__":
    main()
