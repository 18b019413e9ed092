"""Stage distill_ablation@<variant>-<seed>: one ablation run (vldistill.config.Params.for_ablation), trained by
vldistill.train.runs.distill_finetune on ablation.task as model <variant>_seed<seed>."""

from vldistill.cli import print_summary, stage_args, stage_errors
from vldistill.train import runs


def main() -> None:
    args, params = stage_args(__doc__, variant=True, seed=True)
    run_params, model = params.for_ablation(args.variant, args.seed)
    with stage_errors(f"distill_ablation@{args.variant}-{args.seed}"):
        summary = runs.distill_finetune(run_params, params.ablation.task, model)
    print_summary(f"distill_ablation@{args.variant}-{args.seed} ({params.ablation.task}, model {model}): {summary}")


if __name__ == "__main__":
    main()
