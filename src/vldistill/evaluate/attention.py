"""Where a model's text looks in the image: last-layer text→image attention of the teacher and of a student, as heat
maps over the image's patch grid, for a person to compare (report figure; not a metric).

The maps are the same distributions DiDE distils (:func:`vldistill.distill.attention.cross_modal_attention`, Q and K
captured by hooks): the teacher's from its joint pass split at the text length, a dual student's from its text tower's
queries and its image tower's keys. Per example they are averaged over heads and over the real text tokens, the image
[CLS] key is dropped and the rest renormalised: one distribution over patches, shown on the ``(rows, cols)`` grid.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import torch

from vldistill.distill.attention import capture_qk
from vldistill.io import save_figure
from vldistill.distill.knowledge import dual_views, fusion_views
from vldistill.models.dual import DualEncoder
from vldistill.train import tasks


def _patch_distribution(t2i: torch.Tensor, text_mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``t2i (B,H,T,I)`` (I = 1 + patches) → ``(B, rows, cols)``: mean over heads and real text tokens, without the
    image [CLS] key, renormalised to sum to 1 per example."""
    per_token = t2i.mean(dim=1)                                    # (B, T, I)
    weights = text_mask.float() / text_mask.float().sum(dim=1, keepdim=True)
    per_patch = (per_token * weights[:, :, None]).sum(dim=1)[:, 1:]  # (B, P)
    per_patch = per_patch / per_patch.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return per_patch.view(-1, *grid)


@torch.no_grad()
def text_to_image_maps(model, batch: dict) -> torch.Tensor:
    """``(B, rows, cols)`` last-layer text→image attention of ``model`` (a ViLT fusion encoder — teacher or fusion
    student — or a :class:`DualEncoder`) on the batch's first image (NLVR2: the left one)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    key, type_idx = tasks.image_passes(batch)[0]
    pixels = batch[key]
    patch = model.config.patch_size
    grid = (pixels.shape[-2] // patch, pixels.shape[-1] // patch)
    heads, last = model.config.num_attention_heads, model.config.num_hidden_layers - 1
    if isinstance(model, DualEncoder):
        with capture_qk(model.text.layer, [last], heads) as text_qk:
            model.encode_text(ids, mask)
        with capture_qk(model.image.layer, [last], heads) as image_qk:
            model.encode_image(pixels, type_idx)
        view = dual_views(text_qk, {}, image_qk, {}, [last])[last]
    else:
        _, views = fusion_views(model.vilt.encoder.layer, lambda: model.encode(ids, mask, pixels, type_idx), [last],
                                heads, ids.shape[1], want_states=False)
        view = views[last]
    image_mask = torch.ones(len(ids), 1 + grid[0] * grid[1], dtype=torch.bool)
    t2i, _ = view.cross(mask.bool(), image_mask)
    return _patch_distribution(t2i, mask, grid)


def plot_maps(images: torch.Tensor, texts: list[str], maps: dict[str, torch.Tensor], out: str | Path,
              title: str) -> Path:
    """One row per example: the image with its patch grid, then each model's map as a heat grid with the share of
    attention (%) written in each patch; one colour scale per row, so models compare directly.
    ``images (B, H, W, 3)`` uint8; ``maps`` name → ``(B, rows, cols)``. Saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, cols = len(images), 1 + len(maps)
    fig, axes = plt.subplots(n, cols, figsize=(2.4 * cols, 2.8 * n + 0.6), squeeze=False)
    h, w = images.shape[1:3]
    for row in range(n):
        grid_rows, grid_cols = next(iter(maps.values())).shape[1:]
        axes[row, 0].imshow(images[row].numpy(), extent=(0, grid_cols, grid_rows, 0))
        axes[row, 0].set_title("\n".join(textwrap.wrap(texts[row], 30)), fontsize=7)
        top = max(float(m[row].max()) for m in maps.values())
        for col, (name, grid_maps) in enumerate(maps.items(), start=1):
            heat = grid_maps[row].numpy()
            ax = axes[row, col]
            ax.imshow(heat, cmap="viridis", vmin=0.0, vmax=top, extent=(0, grid_cols, grid_rows, 0))
            for (r, c), value in _cells(heat):
                ax.text(c + 0.5, r + 0.5, f"{100 * value:.0f}", ha="center", va="center", fontsize=7,
                        color="black" if value > 0.6 * top else "white")
            ax.set_title(name, fontsize=8)
        for ax in axes[row]:
            ax.set_xticks(range(grid_cols + 1))
            ax.set_yticks(range(grid_rows + 1))
            ax.grid(color="grey", linewidth=0.5)
            ax.tick_params(labelbottom=False, labelleft=False, length=0)
    fig.suptitle(title + "\n(% of the text's attention on each image patch)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, out, dpi=100)


def _cells(heat):
    rows, cols = heat.shape
    return (((r, c), float(heat[r, c])) for r in range(rows) for c in range(cols))


