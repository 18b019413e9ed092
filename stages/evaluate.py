"""Stage evaluate@<task>: metrics/eval/<task>/<model>.json for the teacher and every student variant, and the
attention figure reports/attention/<task>.png (teacher vs students). Runs on fabric.*'s device and precision, sharded
over its processes (fabric.devices x fabric.num_nodes); rank 0 writes."""

from vldistill import paths
from vldistill.cli import stage_args
from vldistill.config import flatten
from vldistill.evaluate.run import attention_figure, evaluate_task
from vldistill.train.loop import make_fabric
from vldistill.train.tracking import Tracker


def main() -> None:
    args, params = stage_args(__doc__, task=True)
    fabric = make_fabric(params.fabric, params.seed)
    with Tracker("evaluate", flatten({"seed": params.seed, "variants": params.variants, "evaluate": params.evaluate,
                                      "fabric": params.fabric}),
                 task=args.task, enabled=fabric.is_global_zero) as tracker:
        results = evaluate_task(params, args.task, fabric)
        if fabric.is_global_zero:
            for model, splits in results.items():
                tracker.log_metrics({f"{model}.{split}.{k}": v for split, m in splits.items() for k, v in m.items()})
                tracker.log_artifact(paths.eval_metrics(args.task, model))
            if args.task == "retrieval":
                tracker.log_artifact(paths.eval_ranking(args.task))
            figure = attention_figure(params, args.task, paths.attention_figure(args.task))
            tracker.log_artifact(figure)
    if fabric.is_global_zero:
        for model, splits in results.items():
            print(f"{args.task} {model}: " + ", ".join(f"{s} {m}" for s, m in splits.items()))
    fabric.barrier()


if __name__ == "__main__":
    main()
