"""Stage teacher_finetune@<task>: see vldistill.train.runs.teacher_finetune."""

from vldistill.cli import print_summary, stage_args, stage_errors
from vldistill.models.hub import check_sources_or_exit
from vldistill.train import runs


def main() -> None:
    args, params = stage_args(__doc__, task=True)
    check_sources_or_exit(params.teacher)
    with stage_errors(f"teacher_finetune@{args.task}"):
        summary = runs.teacher_finetune(params, args.task)
    print_summary(f"teacher_finetune@{args.task}: {summary}")


if __name__ == "__main__":
    main()
