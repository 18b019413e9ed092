"""Stage teacher_pretrain: see vldistill.train.runs.teacher_pretrain."""

from vldistill.cli import stage_args
from vldistill.train import runs


def main() -> None:
    _, params = stage_args(__doc__)
    summary = runs.teacher_pretrain(params)
    print(f"teacher_pretrain: {summary}")


if __name__ == "__main__":
    main()
