"""Metrics over prepared splits."""

from __future__ import annotations

from typing import Callable

import torch


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``argmax(logits (N, C))`` equal to ``labels (N,)``."""
    return float((logits.argmax(dim=-1) == labels).float().mean())


@torch.no_grad()
def predict(logits_fn: Callable[[dict], torch.Tensor], split, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``logits_fn(batch)`` over a whole split in order. Returns ``(logits (N, C), labels (N,))`` on the CPU."""
    outs, labels = [], []
    for batch in split.loader(batch_size, shuffle=False, seed=0):
        batch = {k: v.to(device) for k, v in batch.items()}
        outs.append(logits_fn(batch).float().cpu())
        labels.append(batch["labels"].cpu())
    return torch.cat(outs), torch.cat(labels)


def nlvr2_accuracy(model, split, batch_size: int = 256, device="cpu") -> float:
    """NLVR2 accuracy of a teacher or a dual encoder (both expose ``nlvr2_logits``), in eval mode."""
    was_training = model.training
    model.eval()
    logits, labels = predict(lambda b: model.nlvr2_logits(b["input_ids"], b["attention_mask"], b["pixel_values_left"],
                                                          b["pixel_values_right"]), split, batch_size, device)
    model.train(was_training)
    return accuracy(logits, labels)
