"""Models: the ViLT teacher (transformers), the DiDE dual-encoder student, and their heads."""
