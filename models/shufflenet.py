"""ShuffleNet v1 (Zhang et al., 2017) as a Siamese embedding encoder.

Follows the paper: 1x1 pointwise *group* convolutions, a channel shuffle after
the first of them, a 3x3 depthwise convolution with no ReLU after it, a
bottleneck of 1/4 of the unit's output channels, stride-1 units with an added
identity shortcut and stride-2 units whose shortcut is a 3x3 average pool
concatenated with the branch. The first pointwise layer of stage 2 is not
grouped (its input has too few channels). A width multiplier scales every
layer. The classification layer is replaced by an embedding head whose output
is L2-normalised, so cosine similarity is a plain dot product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Output channels of stages 2-4 at width 1x, per number of groups (paper, Table 1).
STAGE_CHANNELS = {1: (144, 288, 576), 2: (200, 400, 800), 3: (240, 480, 960),
                  4: (272, 544, 1088), 8: (384, 768, 1536)}
STAGE_REPEATS = (3, 7, 3)  # stride-1 units after the stride-2 unit of each stage
STEM_CHANNELS = 24


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.shape
    x = x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(n, c, h, w)


def scaled(channels: int, width: float, multiple: int) -> int:
    """Channels scaled by the width multiplier, rounded to a multiple of `multiple`."""
    return max(multiple, int(round(channels * width / multiple)) * multiple)


class ShuffleUnit(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, groups: int, stride: int, group_first: bool):
        super().__init__()
        self.stride = stride
        self.groups = groups if group_first else 1
        self.shuffle_groups = groups
        # A stride-2 unit concatenates the pooled input, so its branch adds the rest.
        branch_out = out_ch - in_ch if stride == 2 else out_ch
        mid = out_ch // 4
        self.compress = nn.Conv2d(in_ch, mid, 1, groups=self.groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.depthwise = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.expand = nn.Conv2d(mid, branch_out, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(branch_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.compress(x)))
        if self.groups > 1:
            out = channel_shuffle(out, self.groups)
        out = self.bn2(self.depthwise(out))  # no ReLU after the depthwise conv
        out = self.bn3(self.expand(out))
        if self.stride == 2:
            return F.relu(torch.cat([F.avg_pool2d(x, 3, 2, 1), out], dim=1))
        return F.relu(x + out)


class ShuffleNetEncoder(nn.Module):
    """ShuffleNet v1 trunk + embedding head giving L2-normalised vectors."""

    def __init__(self, groups: int = 3, width: float = 0.5, embedding_dim: int = 128,
                 in_channels: int = 3):
        super().__init__()
        if groups not in STAGE_CHANNELS:
            raise ValueError(f"groups must be one of {sorted(STAGE_CHANNELS)}")
        # Every grouped layer needs channel counts divisible by the groups, and the
        # bottleneck (out/4) too: round stage widths to a multiple of 4 * groups.
        stages = [scaled(c, width, 4 * groups) for c in STAGE_CHANNELS[groups]]
        stem = scaled(STEM_CHANNELS, width, 4) if width < 1 else STEM_CHANNELS
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, stem, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(stem), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1))
        units: list[nn.Module] = []
        in_ch = stem
        for stage, (out_ch, repeats) in enumerate(zip(stages, STAGE_REPEATS)):
            units.append(ShuffleUnit(in_ch, out_ch, groups, 2, group_first=stage > 0))
            units += [ShuffleUnit(out_ch, out_ch, groups, 1, True) for _ in range(repeats)]
            in_ch = out_ch
        self.stages = nn.Sequential(*units)
        self.feature_dim = in_ch
        self.head = nn.Linear(in_ch, embedding_dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled trunk features (before the embedding head)."""
        return self.stages(self.stem(x)).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.features(x)), dim=1)


def count_flops(model: ShuffleNetEncoder, size: int) -> int:
    """Multiply-accumulates of one forward pass at `size` x `size` (convs and linear)."""
    macs = 0

    def conv_hook(m: nn.Conv2d, _inp, out):
        nonlocal macs
        k = m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)
        macs += out.numel() // out.shape[0] * k

    def linear_hook(m: nn.Linear, _inp, _out):
        nonlocal macs
        macs += m.in_features * m.out_features

    hooks = [m.register_forward_hook(conv_hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    hooks += [m.register_forward_hook(linear_hook) for m in model.modules() if isinstance(m, nn.Linear)]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    model.train(was_training)
    for h in hooks:
        h.remove()
    return macs
