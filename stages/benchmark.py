"""Stage benchmark: metrics/bench/latency.json (ms per example: teacher, dual, dual with cached images)."""

from vldistill import paths
from vldistill.bench.run import run_benchmark
from vldistill.cli import stage_args
from vldistill.config import flatten
from vldistill.train.tracking import Tracker


def main() -> None:
    _, params = stage_args(__doc__)
    with Tracker("benchmark", flatten({"bench": params.bench})) as tracker:
        results = run_benchmark(params)
        for task, sizes in results["embedded"].items():
            for size, row in sizes.items():
                tracker.log_metrics({f"{task}.b{size}.{k}": v for k, v in row.items()})
        tracker.log_artifact(paths.LATENCY)
    for task, sizes in results["embedded"].items():
        for size, row in sizes.items():
            print(f"{task} batch {size}: teacher {row['teacher_ms']:.3f} ms, dual {row['dual_ms']:.3f} ms, "
                  f"cached {row['dual_cached_ms']:.3f} ms per example")


if __name__ == "__main__":
    main()
