"""vldistill: distil a ViLT fusion encoder into a DiDE dual encoder (importing this package has no side effects)."""

__version__ = "0.1.0"
