"""Stage benchmark: metrics/bench/latency.json (ms per example: teacher, dual, dual with cached images; embedded and
paper size) and metrics/bench/retrieval.json (seconds to score N images x 5N captions)."""

from vldistill import paths
from vldistill.bench.run import RETRIEVAL, run_latency, run_retrieval
from vldistill.cli import stage_args
from vldistill.config import flatten
from vldistill.train.tracking import Tracker

SCALES = ("embedded", "paper")


def main() -> None:
    _, params = stage_args(__doc__)
    with Tracker("benchmark", flatten({"bench": params.bench})) as tracker:
        latency = run_latency(params)
        retrieval = run_retrieval(params)
        for scale in SCALES:
            for task, sizes in latency.get(scale, {}).items():
                for size, row in sizes.items():
                    tracker.log_metrics({f"{scale}.{task}.b{size}.{k}": v for k, v in row.items()
                                         if isinstance(v, (int, float))})
            for n, row in retrieval.get(scale, {}).items():
                tracker.log_metrics({f"{scale}.retrieval.n{n}.{k}": v for k, v in row.items()
                                     if isinstance(v, (int, float)) and not isinstance(v, bool)})
        tracker.log_artifact(paths.LATENCY)
        tracker.log_artifact(RETRIEVAL)
    print(f"{'scale':9}{'task':9}{'batch':>6}{'teacher ms':>12}{'dual ms':>10}{'cached ms':>11}"
          f"{'x dual':>8}{'x cached':>9}")
    for scale in SCALES:
        for task, sizes in latency.get(scale, {}).items():
            for size, row in sizes.items():
                print(f"{scale:9}{task:9}{size:>6}{row['teacher_ms']:12.3f}{row['dual_ms']:10.3f}"
                      f"{row['dual_cached_ms']:11.3f}{row['speedup_uncached']:8.2f}{row['speedup_cached']:9.2f}")
    print(f"{'scale':9}{'N':>6}{'teacher s':>14}{'dual s':>10}{'speed-up':>10}  dual")
    for scale in SCALES:
        for n, row in retrieval.get(scale, {}).items():
            print(f"{scale:9}{n:>6}{row['teacher_s']:14.1f}{row['dual_s']:10.3f}{row['speedup']:10.1f}  "
                  f"{row['dual_measured']}")


if __name__ == "__main__":
    main()
