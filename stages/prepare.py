"""Stage prepare@<task>: generate or read one task into data/prepared/<task>/ and metrics/data/<task>.json."""

from vldistill import paths
from vldistill.cli import stage_args
from vldistill.config import flatten
from vldistill.data.prepared import prepare
from vldistill.train.tracking import Tracker


def main() -> None:
    args, params = stage_args(__doc__, task=True, any_data_task=True)
    data_cfg = getattr(params.data, args.task)
    with Tracker("prepare", flatten({"seed": params.seed, f"data.{args.task}": data_cfg, "data.scene": params.data.scene}),
                 task=args.task) as tracker:
        stats = prepare(args.task, data_cfg, params.data.scene, params.seed, paths.PREPARED, paths.data_metrics(args.task))
        tracker.log_metrics({f"{split}_examples": s["examples"] for split, s in stats["splits"].items()}
                            | {"seconds": stats["seconds"]})
        tracker.log_artifact(paths.data_metrics(args.task))
    print(f"prepared {args.task}: " + ", ".join(f"{k} {v['examples']}" for k, v in stats["splits"].items())
          + f" ({stats['seconds']} s)")


if __name__ == "__main__":
    main()
