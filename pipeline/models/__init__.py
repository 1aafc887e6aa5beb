"""Backbones, the classification and segmentation networks on them, and their weights.

Typical use::

    backbone = build_backbone("resnet38", Path("weights/ilsvrc-cls_rna-a1_cls1000_ep-0001.params"))
    net = CAMNet(backbone, num_classes=20, freeze_bn=True)
    optimizer = torch.optim.SGD(param_groups(net, lr=0.01, weight_decay=5e-4), lr=0.01, momentum=0.9)
    ...
    save_checkpoint(net, "checkpoints/classifier.pth")

    seg = SegNet(build_backbone("resnet38"), num_classes=20, freeze_bn=True)
    load_checkpoint(seg, "checkpoints/classifier.pth", allow_missing=SegNet.seg_head)
    logits, cams, seg_logits = seg(images)

    cams = fold_batch_norms(net).cams(images)  # inference only: batch norms folded into the convolutions
"""

from pipeline.models.backbones import BACKBONES, build_backbone, load_backbone_weights
from pipeline.models.folding import fold_batch_norms
from pipeline.models.nets import (
    CAMNet,
    JointOutput,
    OnBackbone,
    SegNet,
    backbone_modules,
    freeze_batchnorm,
    param_groups,
    seg_dilation,
)
from pipeline.models.weights import load_checkpoint, read_weights, save_checkpoint

__all__ = [
    "BACKBONES",
    "CAMNet",
    "JointOutput",
    "OnBackbone",
    "SegNet",
    "backbone_modules",
    "build_backbone",
    "fold_batch_norms",
    "freeze_batchnorm",
    "load_backbone_weights",
    "load_checkpoint",
    "param_groups",
    "read_weights",
    "save_checkpoint",
    "seg_dilation",
]
