"""DeepLabv3+ (output stride 16, ASPP, v3+ decoder) with per-sample keyed MC dropout.

State-dict layout = VainF/DeepLabV3Plus-Pytorch's ``DeepLabHeadV3Plus`` as used by the authors
(KASTEL-MobilityLab/mixtures-of-experts): ``backbone.*``, ``classifier.project.*`` (low-level
1x1 projection), ``classifier.aspp.convs.{0..4}.*`` (1x1, three atrous 3x3, image pooling),
``classifier.aspp.project.*``, ``classifier.classifier.{0,1,3}.*`` (3x3 conv, BN, 1x1 classifier).

Dropout sites (``l`` in the mask keys):

====  ===========================================================================
0-3   input of the 1x1 and the three atrous ASPP branches (the backbone features)
4     the image-pooling branch, on the pooled feature vector before its 1x1 conv
5     the ASPP projection output (DeepLabv3+'s own dropout; every expert trains with it)
6     before the final 1x1 classifier
====  ===========================================================================

An expert uses site 5 while training only. The MC-dropout baseline uses all sites while
training and in its stochastic passes, whose masks come from
``torch.Generator(seed=key(seed_b, "mc_dropout", t, l))``: sample ``b``'s pass ``t`` never
depends on the batch it is in. Masks differ between CPU and CUDA generators.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shiftbench.errors import ShiftbenchError
from shiftbench.models import checks
from shiftbench.models.backbones import BackboneSpec, backbone_spec
from shiftbench.seeding import key

#: What the model does to its [0, 1] input images before the backbone, by name: (mean, std) per channel,
#: or None for nothing. "imagenet": torchvision's ImageNet statistics (our training, ImageNet-pretrained
#: backbones); "none": the images as they are (the authors' A2D2 checkpoints: their loader only divides by 255).
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]] | None] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "none": None,
}
EXPERT_SITES = (5,)
MC_SITES = (0, 1, 2, 3, 4, 5, 6)


class Dropper(Protocol):
    def __call__(self, x: Tensor, site: int) -> Tensor: ...


def no_dropout(x: Tensor, site: int) -> Tensor:
    return x


class TrainDropout:
    """Ordinary dropout (global RNG) at ``sites``, for training."""

    def __init__(self, p: float, sites: Sequence[int]):
        self.p, self.sites = p, frozenset(sites)

    def __call__(self, x: Tensor, site: int) -> Tensor:
        return F.dropout(x, self.p, training=True) if site in self.sites and self.p > 0 else x


class KeyedDropout:
    """Inverted dropout whose mask for row ``t*B + b`` of a ``[T*B, ...]`` batch is drawn from
    ``torch.Generator(key(seeds[b], "mc_dropout", t, site))``: keep with probability ``1 - p``,
    scale kept values by ``1 / (1 - p)``."""

    def __init__(self, p: float, seeds: Sequence[int], passes: int, sites: Sequence[int] = MC_SITES):
        self.p, self.passes = checks.rate(p, "dropout p"), checks.count(passes, "passes")
        self.seeds, self.sites = checks.seeds(seeds, None), frozenset(sites)

    def mask(self, shape: Sequence[int], site: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """Keep-masks ``[T*B, *shape]`` scaled by ``1 / (1 - p)``."""
        rows = []
        for t in range(self.passes):
            for s in self.seeds:
                g = torch.Generator(device=device)
                g.manual_seed(key(s, "mc_dropout", t, site))
                rows.append(torch.rand(tuple(shape), generator=g, device=device) >= self.p)
        return torch.stack(rows).to(dtype) / (1.0 - self.p)

    def __call__(self, x: Tensor, site: int) -> Tensor:
        if site not in self.sites or self.p == 0:
            return x
        return x * self.mask(x.shape[1:], site, x.device, x.dtype)


def _conv_bn_relu(cin: int, cout: int, k: int, dilation: int = 1) -> list[nn.Module]:
    pad = dilation * (k // 2)
    return [nn.Conv2d(cin, cout, k, padding=pad, dilation=dilation, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True)]


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, three 3x3 at ``rates``, image pooling; concat -> 1x1.

    x [B,C_in,h,w] -> [B,C,h,w].
    """

    def __init__(self, cin: int, rates: Sequence[int], channels: int = 256):
        super().__init__()
        self.convs = nn.ModuleList([nn.Sequential(*_conv_bn_relu(cin, channels, 1))]
                                   + [nn.Sequential(*_conv_bn_relu(cin, channels, 3, r)) for r in rates]
                                   + [nn.Sequential(nn.AdaptiveAvgPool2d(1), *_conv_bn_relu(cin, channels, 1))])
        self.project = nn.Sequential(*_conv_bn_relu(len(self.convs) * channels, channels, 1))

    def forward(self, x: Tensor, drop: Dropper = no_dropout) -> Tensor:
        *atrous, pool = self.convs
        branches = [conv(drop(x, i)) for i, conv in enumerate(atrous)]
        pooled = pool[1:](drop(pool[0](x), len(atrous)))
        branches.append(pooled.expand(-1, -1, *x.shape[-2:]))
        return drop(self.project(torch.cat(branches, 1)), len(atrous) + 1)


class DeepLabHeadV3Plus(nn.Module):
    """ASPP on the stride-16 map, upsampled and fused with the projected stride-4 map.

    features {"low_level": [B,C_low,H/4,W/4], "out": [B,C_out,H/16,W/16]}
    -> (ASPP features [B,C_aspp,H/16,W/16], logits [B,K,H/4,W/4]).
    """

    def __init__(self, spec: BackboneSpec, classes: int):
        super().__init__()
        self.project = nn.Sequential(*_conv_bn_relu(spec.low_level, spec.project, 1))
        self.aspp = ASPP(spec.out, spec.rates, spec.aspp)
        self.classifier = nn.Sequential(*_conv_bn_relu(spec.aspp + spec.project, spec.decoder, 3),
                                        nn.Conv2d(spec.decoder, classes, 1))

    def forward(self, features: dict[str, Tensor], drop: Dropper = no_dropout) -> tuple[Tensor, Tensor]:
        low = self.project(features["low_level"])
        aspp = self.aspp(features["out"], drop)
        up = F.interpolate(aspp, size=low.shape[-2:], mode="bilinear", align_corners=False)
        hidden = self.classifier[:3](torch.cat([low, up], 1))
        return aspp, self.classifier[3](drop(hidden, 6))


class DeepLabV3Plus(nn.Module):
    """DeepLabv3+ on a registered backbone; images in [0,1] ``[B,3,H,W]`` -> logits ``[B,K,H,W]``.

    dropout:    rate at the dropout sites (module docstring).
    mc_dropout: False: an expert (site 5 while training only); True: the MC-dropout baseline
                (all sites while training; :meth:`mc_logits` for the stochastic passes).
    normalize:  a key of :data:`NORMALIZATIONS`: ``(x - mean) / std`` before the backbone, or nothing.
    """

    def __init__(self, backbone: str, classes: int, dropout: float = 0.1, mc_dropout: bool = False,
                 normalize: str = "imagenet"):
        super().__init__()
        classes, dropout = checks.count(classes, "classes"), checks.rate(dropout, "dropout")
        if normalize not in NORMALIZATIONS:
            raise ShiftbenchError(f"normalize must be one of {', '.join(NORMALIZATIONS)}, got {normalize!r}")
        self.backbone_name, self.classes, self.dropout, self.normalize = backbone, classes, dropout, normalize
        self.sites = MC_SITES if mc_dropout else EXPERT_SITES
        spec = backbone_spec(backbone)
        self.backbone = spec.build()
        self.classifier = DeepLabHeadV3Plus(spec, classes)
        stats = NORMALIZATIONS[normalize] or ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        self.register_buffer("mean", torch.tensor(stats[0]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(stats[1]).view(1, 3, 1, 1), persistent=False)

    def encode(self, x: Tensor) -> dict[str, Tensor]:
        """Backbone features of the (normalised) images (``x`` checked: a float batch [B,3,H,W] of the model's dtype)."""
        checks.images(x, next(self.parameters()).dtype)
        return self.backbone(x if NORMALIZATIONS[self.normalize] is None else (x - self.mean) / self.std)

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(ASPP features ``[B,C,H/16,W/16]``, logits ``[B,K,H,W]``) from one pass; dropout as in
        training when ``self.training``, none otherwise."""
        drop = TrainDropout(self.dropout, self.sites) if self.training else no_dropout
        aspp, logits = self.classifier(self.encode(x), drop)
        return aspp, F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)[1]

    def mc_logits(self, x: Tensor, seeds: Sequence[int], passes: int) -> Tensor:
        """Logits ``[T,B,K,H,W]`` of ``passes`` stochastic passes with keyed masks.

        The backbone holds no dropout, so it runs once; the head runs on the ``T*B`` stacked
        copies of its features in one batch.
        """
        passes = checks.count(passes, "passes")
        feats = self.encode(x)
        stacked = {k: v.repeat(passes, 1, 1, 1) for k, v in feats.items()}
        drop = KeyedDropout(self.dropout, checks.seeds(seeds, x.shape[0]), passes, self.sites)
        _, logits = self.classifier(stacked, drop)
        logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits.unflatten(0, (passes, x.shape[0]))
