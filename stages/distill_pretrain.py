"""Stage distill_pretrain: see vldistill.train.runs.distill_pretrain."""

from vldistill.cli import stage_args
from vldistill.train import runs


def main() -> None:
    _, params = stage_args(__doc__)
    summary = runs.distill_pretrain(params)
    print(f"distill_pretrain: {summary}")


if __name__ == "__main__":
    main()
