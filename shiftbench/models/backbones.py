"""Backbones for DeepLabv3+: torchvision ResNets at output stride 16, and a ``tiny`` one for CPUs.

Every backbone is a :class:`torchvision.models._utils.IntermediateLayerGetter`, so its
state-dict keys are the ResNet's own (``conv1.*``, ``layer1.0.conv1.weight``, ...) exactly as
in the authors' checkpoints, and its forward returns ``{"low_level": [B,C_low,H/4,W/4],
"out": [B,C_out,H/16,W/16]}``. Nothing is downloaded: ResNets are built with
``weights=None``; a local ImageNet state dict may be loaded into them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torchvision.models import resnet
from torchvision.models._utils import IntermediateLayerGetter

from shiftbench.errors import ShiftbenchError

RETURN_LAYERS = {"layer1": "low_level", "layer4": "out"}
OUTPUT_STRIDE = 16


@dataclass(frozen=True)
class BackboneSpec:
    """How to build a backbone and the DeepLabv3+ head that fits it.

    low_level / out: channels of the stride-4 and stride-16 feature maps.
    rates:           ASPP atrous rates.
    aspp, project, decoder: channels of the ASPP output, of the low-level projection and of
                     the decoder's 3x3 conv (256 / 48 / 256 in DeepLabv3+).
    gate_grid:       the grid a new gate pools its conv map to before the FC layers when the
                     suite's image size is unknown (native sizes); otherwise the gate's grid is
                     :func:`feature_grid` of that size, so pooling is the identity there.
    """

    build: Callable[[], nn.Module]
    low_level: int
    out: int
    rates: tuple[int, int, int] = (6, 12, 18)
    aspp: int = 256
    project: int = 48
    decoder: int = 256
    gate_grid: tuple[int, int] = (57, 57)
    pretrainable: bool = True


def dilate_last_stage(layer: nn.Sequential, dilation: int = 2) -> nn.Sequential:
    """Replace a ResNet stage's stride 2 by dilation (output stride 32 -> 16), in place.

    Follows torchvision's ``replace_stride_with_dilation``: the first block keeps dilation 1
    and loses its stride; every 3x3 conv of the later blocks gets ``dilation`` and padding.
    Works for BasicBlock stages too, which torchvision refuses to dilate.
    """
    for i, block in enumerate(layer):
        for conv in block.modules():
            if not isinstance(conv, nn.Conv2d):
                continue
            conv.stride = (1, 1)
            if i > 0 and conv.kernel_size == (3, 3):
                conv.dilation, conv.padding = (dilation, dilation), (dilation, dilation)
    return layer


def _resnet(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        net = getattr(resnet, name)(weights=None)
        dilate_last_stage(net.layer4)
        return IntermediateLayerGetter(net, RETURN_LAYERS)

    return build


def _conv_bn_relu(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _basic(cin: int, cout: int, stride: int) -> resnet.BasicBlock:
    down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
    return resnet.BasicBlock(cin, cout, stride, downsample=down)


#: tiny backbone widths: stem (stride 2), then one BasicBlock per stage at strides 4, 8, 16
TINY_WIDTHS = (16, 24, 48, 96)


def _tiny() -> nn.Module:
    """A 4-stage ResNet with one BasicBlock per stage, widths :data:`TINY_WIDTHS`, output stride 16."""
    w = TINY_WIDTHS
    net = nn.Sequential()
    net.add_module("stem", _conv_bn_relu(3, w[0], 2))
    net.add_module("layer1", _basic(w[0], w[1], 2))
    net.add_module("layer2", _basic(w[1], w[2], 2))
    net.add_module("layer3", _basic(w[2], w[3], 2))
    return IntermediateLayerGetter(net, {"layer1": "low_level", "layer3": "out"})


BACKBONES: dict[str, BackboneSpec] = {
    "resnet18": BackboneSpec(_resnet("resnet18"), low_level=64, out=512),
    "resnet50": BackboneSpec(_resnet("resnet50"), low_level=256, out=2048),
    "resnet101": BackboneSpec(_resnet("resnet101"), low_level=256, out=2048),
    # 128x256 input -> 8x16 stride-16 map: the rates 6/12/18 of a 57x57 map scaled by 8/57,
    # and the gate grid is that map, so pooling is the identity at the demo size.
    "tiny": BackboneSpec(_tiny, low_level=TINY_WIDTHS[1], out=TINY_WIDTHS[3], rates=(1, 2, 3), aspp=64,
                         project=16, decoder=48, gate_grid=(8, 16), pretrainable=False),
}


def backbone_spec(name: str) -> BackboneSpec:
    """The registered backbone ``name``; a one-line error lists the allowed names."""
    if name not in BACKBONES:
        raise ShiftbenchError(f"unknown backbone {name!r}; allowed: {', '.join(BACKBONES)}")
    return BACKBONES[name]


def feature_grid(size: tuple[int, int]) -> tuple[int, int]:
    """The stride-16 map of an ``H x W`` image, ``(ceil(H/16), ceil(W/16))``: each of the four
    stride-2 layers (k=3,p=1 / k=7,p=3 / k=1,p=0) maps n to ceil(n/2). 912 -> 57."""
    return tuple(-(-int(n) // OUTPUT_STRIDE) for n in size)


def load_imagenet(backbone: nn.Module, state: dict[str, torch.Tensor], name: str, source: str) -> None:
    """Load a torchvision ImageNet ResNet state dict (its ``fc.*`` is dropped) into ``backbone``."""
    from shiftbench.models.checkpoints import load_strict

    if not BACKBONES[name].pretrainable:
        allowed = ", ".join(n for n, s in BACKBONES.items() if s.pretrainable)
        raise ShiftbenchError(f"{source}: the {name} backbone has no ImageNet weights; they exist for {allowed}")
    load_strict(backbone, {k: v for k, v in state.items() if not k.startswith("fc.")}, source)
