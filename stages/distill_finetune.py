"""Stage distill_finetune@<task>-<variant>: the variant on the task, one replica per seed of ``seeds`` (see
vldistill.train.runs.distill_finetune)."""

from vldistill.cli import print_summary, stage_args, stage_errors
from vldistill.train import runs


def main() -> None:
    args, params = stage_args(__doc__, task=True, variant=True)
    with stage_errors(f"distill_finetune@{args.task}-{args.variant}"):
        summary = runs.distill_finetune(params, args.task, args.variant)
    print_summary(f"distill_finetune@{args.task}-{args.variant}: {summary}")


if __name__ == "__main__":
    main()
