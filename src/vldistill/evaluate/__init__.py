"""Evaluation metrics and prediction over prepared splits."""
