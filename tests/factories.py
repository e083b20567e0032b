"""Small test models, importable by recipes as `factories:<name>` (tests/ is on the path)."""

from __future__ import annotations

import torch
from torch import nn

from edgebundle.zoo import DigitsCNN


def tiny_cnn(num_classes: int = 10) -> nn.Module:
    return DigitsCNN(width=8, num_classes=num_classes)


class DepthwiseSeparable(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU())
        self.pw = nn.Sequential(nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32), nn.ReLU())
        self.head = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.head(self.pw(self.dw(self.stem(x))).mean((2, 3)))


class Residual(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        h = self.stem(x)
        return self.head(torch.relu(h + self.body(h)).mean((2, 3)))


def depthwise_separable() -> nn.Module:
    return DepthwiseSeparable()


def residual() -> nn.Module:
    return Residual()


@torch.library.custom_op("edgebundle_tests::opaque_scale", mutates_args=())
def opaque_scale(x: torch.Tensor) -> torch.Tensor:
    return x * 1.5


@opaque_scale.register_fake
def _(x):
    return torch.empty_like(x)


opaque_scale.register_autograd(lambda ctx, grad: grad * 1.5)


class CustomOpNet(nn.Module):
    """Runs in PyTorch, but its custom op has no ONNX translation: the exporter must refuse it."""

    def __init__(self) -> None:
        super().__init__()
        self.body = DigitsCNN(width=8)

    def forward(self, x):
        return opaque_scale(self.body(x))


def custom_op_net() -> nn.Module:
    return CustomOpNet()


def rgb_only() -> nn.Module:
    """Expects 3 input channels: rejects the digits input spec [1, 1, 8, 8]."""
    return DigitsCNN(width=8, in_channels=3)


def not_a_module():
    return "not a model"


class TwoOutputs(DigitsCNN):
    """The digits CNN returning (logits, features): a model with two outputs."""

    def forward(self, x):
        f = torch.flatten(self.features(x), 1)
        return self.classifier(f), f


def two_outputs() -> nn.Module:
    return TwoOutputs(width=32)


class Saturating(nn.Module):
    """A digits MLP whose first layer has large positive weights on non-negative pixels: int8 u8 x s8 pairs
    overflow 16 bits on CPUs without VNNI (AVX2's pairwise multiply-add saturates), not on VNNI CPUs."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 10)
        with torch.no_grad():
            sign = torch.where(torch.rand(32, 64, generator=g) < 0.5, -1.0, 1.0)
            self.fc1.weight.copy_(sign * (0.5 + 0.5 * torch.rand(32, 64, generator=g)))
            self.fc1.bias.zero_()
            self.fc2.weight.copy_(torch.randn(10, 32, generator=g) * 0.3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def saturating() -> nn.Module:
    return Saturating()


class SaturatingConv(nn.Module):
    """Two convolutions in a row on digits, the first with large weights of one sign: its int8 sums over bright
    pixels saturate in CPUs' 16-bit pair sums without VNNI once ONNX Runtime fuses it (QLinearConv, the next
    convolution's Q after it); exact in 32 bits."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 64, 10)
        with torch.no_grad():
            self.conv.weight.copy_(1.0 + 0.05 * torch.randn(16, 1, 3, 3, generator=g))
            self.fc.weight.copy_(torch.randn(10, 16 * 64, generator=g) * 0.05)

    def forward(self, x):
        return self.fc(torch.relu(self.conv2(self.conv(x))).flatten(1))


def saturating_conv() -> nn.Module:
    return SaturatingConv()


class WideMlp(nn.Module):
    """A digits MLP wide enough that its int8 MatMuls clearly beat fp32 (about 2x on x86 with ONNX Runtime)."""

    def __init__(self, width: int = 1024) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                 nn.Linear(width, 10))

    def forward(self, x):
        return self.net(x)


def wide_mlp() -> nn.Module:
    return WideMlp()
