"""Stage export@<task>: every trained dual student of the task as models/export/<task>/<variant>/ (HF format,
tokenizer, model card, ONNX text tower, image tower and fusion head, checked against PyTorch)."""

from vldistill.cli import stage_args
from vldistill.config import flatten
from vldistill.deploy.run import EXPORTS, dual_variants, export_task
from vldistill.train.tracking import Tracker


def no_dual_student(args, params) -> str | None:
    if not dual_variants(params, args.task):
        return f"--task {args.task}: no dual-encoder student of runs is trained on it; nothing to export"
    return None


def main() -> None:
    args, params = stage_args(__doc__, task=True, check=no_dual_student)
    with Tracker("export", flatten({"deploy.export": params.deploy.export}), task=args.task) as tracker:
        written = export_task(params, args.task)
        for variant, info in written.items():
            tracker.log_metrics({f"{variant}.parity.{k}": v for k, v in info["parity"].items()})
            for name in ("README.md", "vldistill.json"):
                tracker.log_artifact(EXPORTS / args.task / variant / name)
    for variant, info in written.items():
        print(f"{args.task} {variant}: exported to {EXPORTS / args.task / variant} ({info['fingerprint'][:19]}...), "
              f"ONNX opset {info['opset']}, max |onnx - torch| {max(info['parity'].values()):.1e}")


if __name__ == "__main__":
    main()
