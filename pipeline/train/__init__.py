"""Training: the loop every trained stage shares, and the classifier, the segmentation branch and
the two-step DeepLab on it, each with its inference."""
