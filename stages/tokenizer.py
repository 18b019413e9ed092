"""Stage tokenizer: train a WordPiece tokenizer on the enabled tasks' training texts → models/tokenizer/."""

from vldistill import paths
from vldistill.cli import stage_args
from vldistill.config import flatten
from vldistill.data import tokenizer as tok
from vldistill.data.prepared import read_split
from vldistill.train.tracking import Tracker


def main() -> None:
    _, params = stage_args(__doc__)
    texts = []
    for task in ("pretrain", *params.tasks):
        texts += read_split(paths.PREPARED, task, "train")["text"].tolist()
    with Tracker("tokenizer", flatten({"tokenizer": params.tokenizer, "tasks": params.tasks})) as tracker:
        if params.tokenizer.pretrained:
            tokenizer = tok.from_pretrained(params.tokenizer.pretrained, params.teacher.max_text_len)
        else:
            tokenizer = tok.train_tokenizer(texts, params.tokenizer.vocab_size, params.teacher.max_text_len)
        tok.save(tokenizer, paths.TOKENIZER)
        tracker.log_metrics({"vocab_size": len(tokenizer), "texts": len(texts)})
    print(f"tokenizer: {len(tokenizer)} tokens from {len(texts)} texts → {paths.TOKENIZER}")


if __name__ == "__main__":
    main()
