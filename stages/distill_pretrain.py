"""Stage distill_pretrain: see vldistill.train.runs.distill_pretrain."""

from vldistill.cli import print_summary, stage_args, stage_errors
from vldistill.train import runs


def main() -> None:
    _, params = stage_args(__doc__)
    with stage_errors("distill_pretrain"):
        summary = runs.distill_pretrain(params)
    print_summary(f"distill_pretrain: {summary}")


if __name__ == "__main__":
    main()
