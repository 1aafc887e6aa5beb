"""The pruning rule at the path the spec gives it: ``pipeline.prune.reliable_regions`` (its code
lives in :mod:`pipeline.method.prune`)."""

from pipeline.method.prune import reliable_regions

__all__ = ["reliable_regions"]
