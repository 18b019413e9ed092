"""Stage deploy_benchmark: metrics/bench/deploy.json -- onnxruntime vs PyTorch per tower (embedded and paper size),
FAISS exact vs approximate search over synthetic galleries, one text query end to end against the teacher."""

from vldistill.bench.deploy import OUT, run, summary_lines
from vldistill.cli import stage_args
from vldistill.config import flatten
from vldistill.train.tracking import Tracker


def main() -> None:
    _, params = stage_args(__doc__)
    with Tracker("deploy_benchmark", flatten({"deploy.bench": params.deploy.bench})) as tracker:
        result = run(params)
        tracker.log_metrics({f"query.{scale}.{k}": v for scale, row in result["query"].items()
                             for k, v in row.items() if isinstance(v, (int, float))})
        tracker.log_artifact(OUT)
    for line in summary_lines(result):
        print(line)


if __name__ == "__main__":
    main()
