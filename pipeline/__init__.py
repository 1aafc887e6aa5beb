"""Pseudo-label generation for weakly supervised semantic segmentation after Reliable Region Mining."""
