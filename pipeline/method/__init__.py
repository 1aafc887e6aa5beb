"""The method: CAMs, the dense CRF, reliable-region pruning and its mining over a cluster, the
segmentation losses with their permutohedral lattice, and the scores."""
