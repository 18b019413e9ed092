"""Deployment of a trained dual encoder: HF-format and ONNX export, a cached image-embedding index, search/answer."""
