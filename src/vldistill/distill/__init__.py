"""Distillation: attention capture (Q/K hooks, cross-modal distributions) and every knowledge-distillation loss."""
