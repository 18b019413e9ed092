"""vldistill: use an exported dual encoder. Encode a gallery once, then search it and answer questions against
the cached image embeddings (text tower + FAISS, or text tower + fusion head; the image tower never runs again).

examples:
    vldistill index  --model models/export/retrieval/dide --images data/prepared/retrieval --split test --out idx
    vldistill search --index idx "a red circle left of a square" -k 5
    vldistill answer --index vqa_idx --image 17 "what color is the circle?"

Every error is one line on stderr (exit status 2).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

DESCRIPTION = "Use" + __doc__.split("\n\n")[0].removeprefix("vldistill: use").replace("\n", " ")
EPILOG = __doc__.split("\n\n")[1] + "\n\nExports come from `dvc repro export@<task>` (models/export/<task>/<v>)."


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="vldistill", description=DESCRIPTION, epilog=EPILOG,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="command", required=True, metavar="{index,search,answer}")
    runtime = argparse.ArgumentParser(add_help=False)
    runtime.add_argument("--runtime", choices=("torch", "onnx"), default="torch",
                         help="run the towers with PyTorch (default) or onnxruntime (the export's onnx/ graphs)")
    runtime.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads (default: all)")

    index = sub.add_parser("index", parents=[runtime], help="encode a gallery of images into an index",
                           description="Encode every image of a folder (or of a prepared task) with the image tower "
                           "into a FAISS index. An interrupted run, started again, continues where it stopped.")
    index.add_argument("--model", required=True, metavar="DIR", help="an export directory (models/export/<task>/<v>)")
    index.add_argument("--images", required=True, metavar="DIR",
                       help="a folder of image files, or a prepared task (data/prepared/<task>)")
    index.add_argument("--split", choices=("train", "dev", "test"), default=None,
                       help="prepared task only: just the images of this split (default: the whole store)")
    index.add_argument("--out", required=True, metavar="DIR", help="the index directory to write")
    index.add_argument("--batch-size", type=int, default=64, metavar="N", help="images per encoding call (64)")
    index.add_argument("--faiss", choices=("flat", "hnsw", "ivf"), default="flat",
                       help="exact inner product (flat, default) or approximate (hnsw, ivf)")

    search = sub.add_parser("search", parents=[runtime], help="the images that best match a text query",
                            description="Rank the indexed images for a text query: text tower + FAISS search.")
    search.add_argument("query", help="the text to search for")
    search.add_argument("--index", required=True, metavar="DIR", help="an index written by `vldistill index`")
    search.add_argument("-k", type=int, default=5, help="how many images to print (5)")
    search.add_argument("--model", metavar="DIR", help="the export (default: the one the index was built with)")

    answer = sub.add_parser("answer", parents=[runtime], help="answer a question about an indexed image",
                            description="VQA: answer a question; SNLI-VE: entailment of a hypothesis; NLVR2: truth "
                            "of a statement about two images (--image twice). Runs the text tower and the fusion "
                            "head on the cached image embedding.")
    answer.add_argument("text", help="the question, hypothesis or statement")
    answer.add_argument("--index", required=True, metavar="DIR", help="an index written by `vldistill index`")
    answer.add_argument("--image", required=True, action="append", metavar="NAME",
                        help="an image of the index, by name (twice for NLVR2: left, then right)")
    answer.add_argument("-k", type=int, default=3, help="how many answers to print (3)")
    answer.add_argument("--model", metavar="DIR", help="the export (default: the one the index was built with)")
    return top


class Export:
    """An export directory opened for queries: ``info`` (``vldistill.json``), ``config``, tokenizer, runner."""

    def __init__(self, directory: str | Path, runtime: str = "torch", threads: int | None = None):
        from transformers import AutoTokenizer

        from vldistill.deploy.export import read_info
        from vldistill.deploy.hf import DualEncoderConfig

        self.directory = Path(directory)
        self.info = read_info(self.directory)
        self.config = DualEncoderConfig.from_pretrained(str(self.directory))
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.directory))
        if threads:
            import torch

            torch.set_num_threads(threads)
        if runtime == "onnx":
            from vldistill.deploy.onnx_towers import OnnxRunner

            self.runner = OnnxRunner(self.directory / "onnx", threads)
        else:
            from vldistill.deploy.hf import DualEncoderModel
            from vldistill.deploy.onnx_towers import TorchRunner

            self.runner = TorchRunner(DualEncoderModel.from_pretrained(str(self.directory)).dual)

    def encode_text(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """One text → ``(text_cls (1, D), text_embeds (1, D))``, tokenised as in training (padded to max_text_len)."""
        from vldistill.data.datasets import tokenize

        if not text.strip():
            raise ValueError("the text is empty")
        ids, mask = tokenize(self.tokenizer, [text], self.config.max_text_len)
        return self.runner.text(ids.numpy(), mask.numpy())


def open_for(index, model: str | None, runtime: str, threads: int | None) -> Export:
    """The index's export (or ``model``), refused when its fingerprint is not the one the index was built with."""
    export = Export(model or index.meta["model"], runtime, threads)
    if export.info["fingerprint"] != index.meta["fingerprint"]:
        raise ValueError(f"--model {export.directory}: not the model the index was built with (index "
                         f"{index.meta['fingerprint'][:19]}..., model {export.info['fingerprint'][:19]}...)")
    return export


def run_index(args) -> None:
    from vldistill.deploy.images import open_source
    from vldistill.deploy.index import build_index

    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size}: must be >= 1")
    export = Export(args.model, args.runtime, args.threads)
    source = open_source(args.images, export.config.image_size, export.config.pixel_norm, args.split)
    meta = build_index(export.runner, source, args.out, model_dir=export.directory, info=export.info,
                       batch_size=args.batch_size, kind=args.faiss)
    print(f"{args.out}: {meta['count']} images, {meta['dim']}-d, faiss {meta['faiss']}, model {meta['model']}")


def run_search(args) -> None:
    from vldistill.deploy.index import ImageIndex

    if args.k < 1:
        raise ValueError(f"-k {args.k}: must be >= 1")
    index = ImageIndex(args.index)
    export = open_for(index, args.model, args.runtime, args.threads)
    scores, rows = index.search(export.encode_text(args.query)[1], args.k)
    print(f"{'rank':>4}  {'score':>7}  image")
    for rank, (score, row) in enumerate(zip(scores[0], rows[0]), 1):
        print(f"{rank:>4}  {score:7.4f}  {index.names[row]}")


def answer_scores(export: Export, index, text: str, images: list[str]) -> np.ndarray:
    """``(C,)`` probabilities of each label: sigmoid for VQA (trained with BCE over answers), else softmax."""
    task = export.info["task"]
    if task == "retrieval":
        raise ValueError(f"{export.directory}: a retrieval model has no answer head; use `vldistill search`")
    wanted = 2 if task == "nlvr2" else 1
    if len(images) != wanted:
        raise ValueError(f"--image: a {task} model takes {wanted} image(s), got {len(images)}"
                         + (" (left, then right)" if task == "nlvr2" else ""))
    cls = [index.cls(images[0])] + ([index.cls(images[1], second=True)] if task == "nlvr2" else [])
    logits = export.runner.head(export.encode_text(text)[0], *cls)[0].astype(np.float64)
    if task == "vqa":
        return 1.0 / (1.0 + np.exp(-logits))
    exp = np.exp(logits - logits.max())
    return exp / exp.sum()


def run_answer(args) -> None:
    from vldistill.deploy.index import ImageIndex

    if args.k < 1:
        raise ValueError(f"-k {args.k}: must be >= 1")
    index = ImageIndex(args.index)
    export = open_for(index, args.model, args.runtime, args.threads)
    probs = answer_scores(export, index, args.text, args.image)
    labels = export.config.id2label
    print(f"{'score':>7}  answer")
    for i in np.argsort(-probs, kind="stable")[:args.k]:
        print(f"{probs[i]:7.4f}  {labels.get(int(i), str(i))}")


COMMANDS = {"index": run_index, "search": run_search, "answer": run_answer}


def main(argv: list[str] | None = None) -> None:
    from transformers.utils import logging

    from vldistill.deploy.index import UnknownImage

    args = parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.disable_progress_bar()
    try:
        COMMANDS[args.command](args)
    except (ValueError, UnknownImage, FileNotFoundError) as err:
        message = err.args[0] if err.args else repr(err)
        print(f"vldistill {args.command}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
