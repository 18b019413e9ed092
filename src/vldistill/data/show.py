"""Draw prepared examples with their text and label, for any task.

    python -m vldistill.data.show --task nlvr2 --n 8 --out reports/figures/nlvr2_examples.png
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import numpy as np

from vldistill.data.prepared import read_images, read_split
from vldistill.io import save_figure


def _label(row) -> str:
    if "label_name" in row:
        return str(row["label_name"])
    if "answers" in row:
        return "answer: " + ", ".join(f"{a} ({s:.1f})" for a, s in zip(row["answers"], row["scores"], strict=True))
    return str(row.get("image_id", ""))


def draw_examples(root: str | Path, task: str, split: str, n: int, out: str | Path, seed: int = 0) -> Path:
    """Save a grid of ``n`` random examples of ``task/split`` (image(s), wrapped text, label) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = read_split(root, task, split)
    images = read_images(root, task)
    rows = frame.sample(min(n, len(frame)), random_state=seed)
    cols = 4
    lines = (len(rows) + cols - 1) // cols
    fig, axes = plt.subplots(lines, cols, figsize=(4 * cols, 3.6 * lines), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (_, row) in zip(axes.flat, rows.iterrows(), strict=False):  # spare axes stay blank
        if "image_left" in row:
            left, right = images[row["image_left"]], images[row["image_right"]]
            gap = np.full((left.shape[0], 4, 3), 255, dtype=np.uint8)
            picture = np.concatenate([left, gap, right], axis=1)
        else:
            picture = images[row["image"]]
        ax.imshow(picture, interpolation="nearest")
        ax.set_title("\n".join(textwrap.wrap(row["text"], 34)) + f"\n→ {_label(row)}", fontsize=9)
    fig.suptitle(f"{task} / {split}: {len(frame)} examples", fontsize=11)
    fig.tight_layout()
    return save_figure(fig, out, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True)
    parser.add_argument("--split", default="train")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--root", default="data/prepared")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = draw_examples(args.root, args.task, args.split, args.n,
                        args.out or f"reports/figures/{args.task}_examples.png")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
