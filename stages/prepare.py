"""Stage prepare@<task>: generate or read one task into data/prepared/<task>/, metrics/data/<task>.json and
reports/data/<task>_examples.png (examples drawn with their text and label)."""

from vldistill import paths
from vldistill.cli import stage_args
from vldistill.config import flatten
from vldistill.data.download import missing_source
from vldistill.data.official import DataError
from vldistill.data.prepared import prepare
from vldistill.data.show import draw_examples
from vldistill.train.tracking import Tracker


def main() -> None:
    args, params = stage_args(__doc__, task=True, any_data_task=True,
                              check=lambda args, params: missing_source(args.task, getattr(params.data, args.task)))
    data_cfg = getattr(params.data, args.task)
    with Tracker("prepare", flatten({"seed": params.seed, f"data.{args.task}": data_cfg, "data.scene": params.data.scene}),
                 task=args.task) as tracker:
        try:
            stats = prepare(args.task, data_cfg, params.data.scene, params.seed, paths.PREPARED,
                            paths.data_metrics(args.task))
        except DataError as err:
            raise SystemExit(f"error: {err}") from None
        tracker.log_metrics({f"{split}_examples": s["examples"] for split, s in stats["splits"].items()}
                            | {"seconds": stats["seconds"]})
        figure = draw_examples(paths.PREPARED, args.task, "train", 8, paths.data_examples(args.task), seed=params.seed)
        tracker.log_artifact(paths.data_metrics(args.task))
        tracker.log_artifact(figure)
    print(f"prepared {args.task}: " + ", ".join(f"{k} {v['examples']}" for k, v in stats["splits"].items())
          + f" ({stats['seconds']} s)")


if __name__ == "__main__":
    main()
