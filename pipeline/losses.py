"""The bilateral filter at the path the spec gives it: ``pipeline.losses.bilateral_filter`` (its
code lives in :mod:`pipeline.method.losses`)."""

from pipeline.method.losses import bilateral_filter

__all__ = ["bilateral_filter"]
