"""Datasets: manifests and their builders (the synthetic generators, VOC, a folder of photos),
screening for bad files, and the PyTorch datasets with their augmentation."""
