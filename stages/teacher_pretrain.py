"""Stage teacher_pretrain: see vldistill.train.runs.teacher_pretrain."""

from vldistill.cli import print_summary, stage_args, stage_errors
from vldistill.models.hub import check_sources_or_exit
from vldistill.train import runs


def main() -> None:
    _, params = stage_args(__doc__)
    check_sources_or_exit(params.teacher)
    with stage_errors("teacher_pretrain"):
        summary = runs.teacher_pretrain(params)
    print_summary(f"teacher_pretrain: {summary}")


if __name__ == "__main__":
    main()
