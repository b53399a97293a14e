"""PSPNet (Zhao et al., CVPR 2017): a dilated ResNet, the pyramid pooling module and a 3x3 head.

The state-dict keys follow hszhao/semseg's ``model/pspnet.py`` exactly (``layer0..layer4``, ``ppm``, ``cls``,
``aux``), so an imported semseg checkpoint loads with ``strict=True``:

    image (N, 3, H, W)
      -> layer0..layer4 (dilated ResNet, output stride 8)      c3 (N, 1024, H/8, W/8), c4 (N, 2048, H/8, W/8)
      -> ppm: [c4, up(pool_1), up(pool_2), up(pool_3), up(pool_6)]                      (N, 4096, H/8, W/8)
      -> cls: conv3x3 512 + BN + ReLU + Dropout2d + conv1x1 C                           (N, C, H/8, W/8)
      -> bilinear upsampling to the input size                                          (N, C, H, W)
    aux (training only): the same head (256 wide) on c3                                  (N, C, H, W)

The model returns logits only; the loss lives in ``pipeline.training.losses``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.model.resnet import DilatedResNet

if TYPE_CHECKING:
    from pipeline.config import ModelConfig

_POOLS: dict[str, type[nn.Module]] = {"avg": nn.AdaptiveAvgPool2d, "max": nn.AdaptiveMaxPool2d}
_PPM_ORDERS = ("bins", "reversed")


class PPM(nn.Module):
    """Pyramid pooling module (Sec. 3.2): pool to ``bin x bin``, 1x1 conv + BN + ReLU, upsample, concatenate.

    Args:
        in_channels: channels of the input feature map (2048 for ResNet-50).
        branch_channels: output channels of each branch's 1x1 conv (512 in the paper: in_channels / 4).
        bins: output sizes of the adaptive pooling; ``features[i]`` pools to ``bins[i]``.
        pooling: "avg" (the paper's default) or "max".
        align_corners: passed to the bilinear upsampling.
        order: "bins" concatenates ``[x, bins[0], bins[1], ...]`` (semseg, mmseg, CSAIL: [x, 1, 2, 3, 6]);
            "reversed" concatenates ``[x, bins[-1], ..., bins[0]]`` (Caffe: [x, 6, 3, 2, 1]).

    Attributes:
        out_channels: ``in_channels + len(bins) * branch_channels``.
    """

    def __init__(
        self,
        in_channels: int,
        branch_channels: int,
        bins: tuple[int, ...],
        pooling: str = "avg",
        align_corners: bool = False,
        order: str = "bins",
    ) -> None:
        super().__init__()
        if pooling not in _POOLS:
            raise ValueError(f"unknown PPM pooling {pooling!r}; expected one of {sorted(_POOLS)}")
        if len(bins) == 0 or any(int(b) < 1 for b in bins):
            raise ValueError(f"bins must be a non-empty sequence of positive ints, got {bins!r}")
        if order not in _PPM_ORDERS:
            raise ValueError(f"unknown PPM order {order!r}; expected one of {list(_PPM_ORDERS)}")
        pool = _POOLS[pooling]
        self.order = order
        self.bins = tuple(int(b) for b in bins)
        self.align_corners = align_corners
        # Keys: features.{i}.1.weight (conv), features.{i}.2.* (BN), as semseg.
        self.features = nn.ModuleList(
            nn.Sequential(
                pool(b),
                nn.Conv2d(in_channels, branch_channels, 1, bias=False),
                nn.BatchNorm2d(branch_channels),
                nn.ReLU(inplace=True),
            )
            for b in self.bins
        )
        self.out_channels = in_channels + len(self.bins) * branch_channels

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]  # (h, w) = (H/8, W/8)
        branches = list(self.features) if self.order == "bins" else list(self.features)[::-1]
        outs = [x]  # (N, Cin, h, w)
        for branch in branches:
            y = branch(x)  # (N, Cb, bin, bin)
            outs.append(F.interpolate(y, size=size, mode="bilinear", align_corners=self.align_corners))
        return torch.cat(outs, dim=1)  # (N, Cin + len(bins) * Cb, h, w)


def _head(in_channels: int, mid_channels: int, num_classes: int, dropout: float) -> nn.Sequential:
    """conv3x3 + BN + ReLU + Dropout2d + conv1x1 (indices 0, 1, 4 carry parameters, as semseg's cls/aux)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, mid_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(mid_channels),
        nn.ReLU(inplace=True),
        nn.Dropout2d(p=dropout),
        nn.Conv2d(mid_channels, num_classes, 1),
    )


class PSPNet(nn.Module):
    """PSPNet on a :class:`DilatedResNet`; ``use_ppm=False`` gives the paper's "ResNet-Baseline" (dilated FCN).

    The backbone's stages are registered directly on this module as ``layer0..layer4`` (not under a
    ``backbone.`` prefix) so that the state-dict keys equal semseg's.

    Args:
        backbone: the feature extractor; its ``layer0..layer4`` are taken over.
        num_classes: number of output channels.
        use_ppm: insert the pyramid pooling module between layer4 and the head.
        bins: PPM pooling sizes (1, 2, 3, 6 in the paper).
        pooling: PPM pooling, "avg" or "max".
        reduction: PPM branch channels = round(layer4 channels * reduction); None = 1 / len(bins) (Sec. 3.2).
        head_channels: width of the final 3x3 conv (512).
        aux: build the auxiliary head on layer3 (deep supervision, Sec. 4).
        aux_channels: width of the auxiliary 3x3 conv (256, as semseg and mmseg).
        dropout: Dropout2d probability before both classifiers.
        align_corners: for every bilinear upsampling inside the model (semseg True; mmseg, CSAIL False).
        ppm_order: PPM concatenation order, "bins" or "reversed" (see :class:`PPM`).
    """

    def __init__(
        self,
        backbone: DilatedResNet,
        num_classes: int,
        *,
        use_ppm: bool = True,
        bins: tuple[int, ...] = (1, 2, 3, 6),
        pooling: str = "avg",
        reduction: float | None = None,
        head_channels: int = 512,
        aux: bool = True,
        aux_channels: int = 256,
        dropout: float = 0.1,
        align_corners: bool = False,
        ppm_order: str = "bins",
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes!r}")
        if reduction is not None and not 0 < reduction <= 1:
            raise ValueError(f"reduction must be None or a ratio in (0, 1], got {reduction!r}")
        self.num_classes = num_classes
        self.align_corners = align_corners

        self.layer0 = backbone.layer0
        self.layer1 = backbone.layer1
        self.layer2 = backbone.layer2
        self.layer3 = backbone.layer3
        self.layer4 = backbone.layer4

        in_channels = backbone.out_channels_layer4
        if use_ppm:
            ratio = 1.0 / len(bins) if reduction is None else reduction
            branch_channels = max(1, round(in_channels * ratio))
            self.ppm: PPM | None = PPM(
                in_channels, branch_channels, bins, pooling, align_corners, order=ppm_order
            )
            in_channels = self.ppm.out_channels
        else:
            self.ppm = None
        self.cls = _head(in_channels, head_channels, num_classes, dropout)
        self.aux: nn.Sequential | None = (
            _head(backbone.out_channels_layer3, aux_channels, num_classes, dropout) if aux else None
        )

    def _upsample(self, x: Tensor, size: torch.Size) -> Tensor:
        # Logits leave the network as float32 NCHW whatever the network ran in (bf16 autocast, channels-last):
        # converting the 1/8-size map is cheap, while on CPU a channels-last bilinear upsampling is ~7x slower
        # and so is a softmax over channels-last classes (measured for 150 classes at 473 px, 2 threads).
        return F.interpolate(
            x.float().contiguous(), size=size, mode="bilinear", align_corners=self.align_corners
        )

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Logits at the input size: ``{"out"}``, plus ``{"aux"}`` in training mode when the aux head exists."""
        size = x.shape[-2:]  # (H, W)
        x = self.layer0(x)  # (N, s2, H/4, W/4)
        x = self.layer1(x)  # (N, 256, H/4, W/4)
        x = self.layer2(x)  # (N, 512, H/8, W/8)
        c3 = self.layer3(x)  # (N, 1024, H/8, W/8)
        c4 = self.layer4(c3)  # (N, 2048, H/8, W/8)
        feats = self.ppm(c4) if self.ppm is not None else c4  # (N, 4096, H/8, W/8) or (N, 2048, H/8, W/8)
        out = self._upsample(self.cls(feats), size)  # (N, C, H/8, W/8) -> (N, C, H, W)
        result = {"out": out}
        if self.training and self.aux is not None:
            result["aux"] = self._upsample(self.aux(c3), size)  # (N, C, H/8, W/8) -> (N, C, H, W)
        return result

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of ``layer0..layer4`` (the pre-trained part; base learning rate)."""
        for layer in (self.layer0, self.layer1, self.layer2, self.layer3, self.layer4):
            yield from layer.parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of ``ppm``, ``cls`` and ``aux`` (new layers; 10x learning rate)."""
        for module in (self.ppm, self.cls, self.aux):
            if module is not None:
                yield from module.parameters()


def build_model(cfg: ModelConfig, num_classes: int) -> PSPNet:
    """Build PSPNet from the ``model`` section of ``params.yaml`` (the only place that reads it)."""
    backbone = DilatedResNet(
        cfg.depth,
        width=cfg.width,
        stem_widths=tuple(cfg.stem_widths),
        output_stride=cfg.output_stride,
        contract_dilation=cfg.contract_dilation,
    )
    return PSPNet(
        backbone,
        num_classes,
        use_ppm=cfg.use_ppm,
        bins=tuple(cfg.bins),
        pooling=cfg.pooling,
        reduction=cfg.reduction,
        head_channels=cfg.head_channels,
        aux=cfg.aux,
        aux_channels=cfg.aux_channels,
        dropout=cfg.dropout,
        align_corners=cfg.align_corners,
        ppm_order=cfg.ppm_order,
    )
