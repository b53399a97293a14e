"""A dilated ResNet with the deep stem, laid out like hszhao/semseg's ``model/resnet.py``.

Module names follow semseg so that a semseg checkpoint maps 1:1 onto ours (``layer0.0.weight``,
``layer1.0.conv1.weight``, ``layer4.2.bn3.running_var``, ...):

    layer0  deep stem: conv3x3 s2 (3->s0), BN, ReLU, conv3x3 (s0->s1), BN, ReLU, conv3x3 (s1->s2), BN, ReLU,
            maxpool 3x3 s2 p1                                                  # (N, s2, H/4, W/4)
    layer1  blocks at stride 4                                                 # (N, 64e, H/4, W/4)
    layer2  blocks at stride 8                                                 # (N, 128e, H/8, W/8)
    layer3  stride 16, or stride 1 + dilation 2 when output_stride == 8        # (N, 256e, H/8, W/8)
    layer4  stride 32, or stride 1 + dilation 2/4 when output_stride is 16/8   # (N, 512e, H/8, W/8)

``e`` is the block expansion (1 for BasicBlock, 4 for Bottleneck). The downsampling stride sits on the 3x3
conv ("pytorch style", as semseg and torchvision). In a dilated stage *every* block is dilated, the first one
included, and the first block's 1x1 downsample has stride 1 -- semseg's convention. With
``contract_dilation=True`` the first block of a dilated stage uses half the dilation instead (layer3: 1 then
2, layer4: 2 then 4), as CSAIL's ``_nostride_dilate`` and mmseg's ResNetV1c ``contract_dilation`` do (see
pspnet_reference.yaml ``conventions_for_weight_parity``). The switch changes no parameter, only the forward.
"""

from __future__ import annotations

from torch import Tensor, nn

BLOCKS_PER_STAGE: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}
BASE_WIDTHS: tuple[int, int, int, int] = (64, 128, 256, 512)
# output_stride -> (stride, dilation) of layer3 and layer4; layer1/layer2 never change.
_STAGE_SETTINGS: dict[int, tuple[tuple[int, int], tuple[int, int]]] = {
    8: ((1, 2), (1, 4)),
    16: ((2, 1), (1, 2)),
    32: ((2, 1), (2, 1)),
}


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution without bias whose padding keeps the size (up to the stride)."""
    return nn.Conv2d(
        in_channels, out_channels, 3, stride=stride, padding=dilation, dilation=dilation, bias=False
    )


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34).

    The stride sits on ``conv1``; when the stage is dilated both 3x3 convs use the stage's dilation.
    """

    expansion = 1

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, 1, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)  # (N, P, H/s, W/s)
        out = self.relu(self.bn1(self.conv1(x)))  # (N, P, H/s, W/s)
        out = self.bn2(self.conv2(out))  # (N, P, H/s, W/s)
        return self.relu(out + identity)  # (N, P, H/s, W/s)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (stride and dilation here), 1x1 expand by 4, with a residual connection."""

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)  # (N, 4P, H/s, W/s)
        out = self.relu(self.bn1(self.conv1(x)))  # (N, P, H, W)
        out = self.relu(self.bn2(self.conv2(out)))  # (N, P, H/s, W/s)
        out = self.bn3(self.conv3(out))  # (N, 4P, H/s, W/s)
        return self.relu(out + identity)  # (N, 4P, H/s, W/s)


class DilatedResNet(nn.Module):
    """ResNet backbone with the deep stem and dilated last stages (PSPNet Sec. 3.2/4).

    Args:
        depth: 18, 34 (BasicBlock) or 50, 101, 152 (Bottleneck).
        width: multiplier on the stage widths (64, 128, 256, 512); 1.0 is the paper's network.
        stem_widths: output channels of the stem's three 3x3 convs; semseg uses (64, 64, 128).
        output_stride: 8 (layer3 and layer4 dilated by 2 and 4, the paper), 16 (layer4 dilated by 2) or 32.
        contract_dilation: the first block of a dilated stage uses ``dilation // 2`` (CSAIL, mmseg); False
            dilates every block fully (semseg).

    Attributes:
        out_channels_layer3: channels of the layer3 output (1024 for ResNet-50 at width 1).
        out_channels_layer4: channels of the layer4 output (2048 for ResNet-50 at width 1).
    """

    def __init__(
        self,
        depth: int,
        width: float = 1.0,
        stem_widths: tuple[int, int, int] = (64, 64, 128),
        output_stride: int = 8,
        contract_dilation: bool = False,
    ) -> None:
        super().__init__()
        if depth not in BLOCKS_PER_STAGE:
            raise ValueError(
                f"unsupported ResNet depth {depth!r}; expected one of {sorted(BLOCKS_PER_STAGE)}"
            )
        if output_stride not in _STAGE_SETTINGS:
            raise ValueError(f"unsupported output_stride {output_stride!r}; expected one of 8, 16, 32")
        if not width > 0:
            raise ValueError(f"width must be a positive multiplier, got {width!r}")
        if len(stem_widths) != 3 or any(int(c) < 1 for c in stem_widths):
            raise ValueError(f"stem_widths must be three positive channel counts, got {stem_widths!r}")

        block: type[BasicBlock] | type[Bottleneck] = BasicBlock if depth < 50 else Bottleneck
        planes = [max(1, round(base * width)) for base in BASE_WIDTHS]
        s0, s1, s2 = (int(c) for c in stem_widths)
        self.depth = depth
        self.output_stride = output_stride
        self.contract_dilation = contract_dilation

        # Indices 0, 1, 3, 4, 6, 7 carry parameters, as semseg's layer0.
        self.layer0 = nn.Sequential(
            _conv3x3(3, s0, stride=2),
            nn.BatchNorm2d(s0),
            nn.ReLU(inplace=True),
            _conv3x3(s0, s1),
            nn.BatchNorm2d(s1),
            nn.ReLU(inplace=True),
            _conv3x3(s1, s2),
            nn.BatchNorm2d(s2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        (stride3, dilation3), (stride4, dilation4) = _STAGE_SETTINGS[output_stride]
        blocks = BLOCKS_PER_STAGE[depth]
        in_channels = s2
        contract = contract_dilation
        self.layer1, in_channels = self._make_layer(block, in_channels, planes[0], blocks[0], 1, 1)
        self.layer2, in_channels = self._make_layer(block, in_channels, planes[1], blocks[1], 2, 1)
        self.layer3, in_channels = self._make_layer(
            block, in_channels, planes[2], blocks[2], stride3, dilation3, contract
        )
        self.out_channels_layer3 = in_channels
        self.layer4, in_channels = self._make_layer(
            block, in_channels, planes[3], blocks[3], stride4, dilation4, contract
        )
        self.out_channels_layer4 = in_channels

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _make_layer(
        block: type[BasicBlock] | type[Bottleneck],
        in_channels: int,
        planes: int,
        num_blocks: int,
        stride: int,
        dilation: int,
        contract_dilation: bool = False,
    ) -> tuple[nn.Sequential, int]:
        """One stage; only block 0 gets ``stride``; every block gets ``dilation`` (semseg style), except
        block 0 gets ``dilation // 2`` when ``contract_dilation`` and the stage is dilated (CSAIL, mmseg)."""
        out_channels = planes * block.expansion
        downsample = None
        if stride != 1 or in_channels != out_channels:
            downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        first_dilation = dilation // 2 if contract_dilation and dilation > 1 else dilation
        layers = [block(in_channels, planes, stride, first_dilation, downsample)]
        layers += [block(out_channels, planes, 1, dilation) for _ in range(1, num_blocks)]
        return nn.Sequential(*layers), out_channels

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return the layer3 and layer4 features (shapes for output_stride 8)."""
        x = self.layer0(x)  # (N, s2, H/4, W/4)
        x = self.layer1(x)  # (N, 64e, H/4, W/4)
        x = self.layer2(x)  # (N, 128e, H/8, W/8)
        c3 = self.layer3(x)  # (N, 256e, H/8, W/8)
        c4 = self.layer4(c3)  # (N, 512e, H/8, W/8)
        return c3, c4
