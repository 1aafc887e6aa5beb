"""Batch norms folded into the convolutions before them, for inference."""

from __future__ import annotations

import copy
from collections import Counter
from typing import TypeVar

from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

M = TypeVar("M", bound=nn.Module)


def _conv_bn_pairs(module: nn.Module) -> list[tuple[str, str]]:
    """(convolution, batch norm) names where the norm takes the convolution's output and nothing
    else does, each module called once in ``module.forward`` (traced with torch.fx)."""
    graph = fx.symbolic_trace(module).graph
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    modules = dict(module.named_modules())
    pairs = []
    for node in graph.nodes:
        source = node.args[0] if node.op == "call_module" and node.args else None
        if not (isinstance(source, fx.Node) and source.op == "call_module" and len(source.users) == 1):
            continue
        conv, norm = modules[source.target], modules[node.target]
        if (
            isinstance(conv, nn.Conv2d)
            and isinstance(norm, nn.BatchNorm2d)
            and norm.track_running_stats
            and calls[source.target] == calls[node.target] == 1
        ):
            pairs.append((source.target, node.target))
    return pairs


def fold_batch_norms(module: M) -> M:
    """A copy of ``module`` in eval mode whose batch norms that directly follow a convolution are
    folded into its weights and bias (and replaced by identities).

    In eval mode a batch norm is a per-channel affine map, so the copy computes the same function
    up to float rounding (below 1e-5 relative) with one pass over the activations fewer per
    folded norm. The pairs are found by tracing ``module.forward``; the copy keeps ``module``'s
    class, attributes and methods. Pre-activation networks (ResNet-38) fold the norms inside
    their blocks; a norm after an addition stays.
    """
    folded = copy.deepcopy(module).eval()
    for conv, norm in _conv_bn_pairs(folded):
        folded.set_submodule(conv, fuse_conv_bn_eval(folded.get_submodule(conv), folded.get_submodule(norm)))
        folded.set_submodule(norm, nn.Identity())
    return folded
