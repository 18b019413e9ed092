"""Stage evaluate@<task>: metrics/eval/<task>/<model>.json for the teacher and every student variant, and the
attention figure reports/attention/<task>.png (teacher vs students)."""

from vldistill import paths
from vldistill.cli import stage_args
from vldistill.config import flatten
from vldistill.evaluate.run import attention_figure, evaluate_task
from vldistill.train.tracking import Tracker


def main() -> None:
    args, params = stage_args(__doc__, task=True)
    with Tracker("evaluate", flatten({"seed": params.seed, "variants": params.variants}), task=args.task) as tracker:
        results = evaluate_task(params, args.task)
        for model, splits in results.items():
            tracker.log_metrics({f"{model}.{split}.{k}": v for split, m in splits.items() for k, v in m.items()})
            tracker.log_artifact(paths.eval_metrics(args.task, model))
        figure = attention_figure(params, args.task, paths.attention_figure(args.task))
        tracker.log_artifact(figure)
    for model, splits in results.items():
        print(f"{args.task} {model}: " + ", ".join(f"{s} {m}" for s, m in splits.items()))


if __name__ == "__main__":
    main()
