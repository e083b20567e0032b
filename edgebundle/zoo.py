"""Model architectures defined in the project (no torchvision, no hub downloads).

`digits_cnn` is the embedded default's teacher: a small CNN for scikit-learn's 8x8 `digits` images.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class DigitsCNN(nn.Module):
    """Conv-BN-ReLU x4 with one 2x2 pooling, global average pooling, linear classifier."""

    def __init__(self, width: int = 32, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn_relu(in_channels, width),
            _conv_bn_relu(width, 2 * width),
            nn.MaxPool2d(2),
            _conv_bn_relu(2 * width, 2 * width),
            _conv_bn_relu(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def digits_cnn(width: int = 32, num_classes: int = 10) -> DigitsCNN:
    return DigitsCNN(width=width, num_classes=num_classes)


# ---- reference architectures (torchvision layouts, defined here: torchvision cannot be used) -----------


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + idt)


class ResNet18(nn.Module):
    """ResNet-18 (1.82 GMAC at 224x224), torchvision's layout."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers, cin = [], 64
        for i, cout in enumerate((64, 128, 256, 512)):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
                   nn.ReLU6(inplace=True), nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 width 1.0 (0.30 GMAC at 224x224), torchvision's layout."""

    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        feats: list[nn.Module] = [nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32),
                                                nn.ReLU6(inplace=True))]
        cin = 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                feats.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        feats.append(nn.Sequential(nn.Conv2d(cin, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU6(inplace=True)))
        self.features = nn.Sequential(*feats)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def resnet18(num_classes: int = 1000) -> ResNet18:
    return ResNet18(num_classes)


def mobilenet_v2(num_classes: int = 1000) -> MobileNetV2:
    return MobileNetV2(num_classes)


def set_bn_stats_from_data(model: nn.Module, batches: int = 8, batch_size: int = 8,
                           shape: tuple[int, ...] = (3, 224, 224), seed: int = 0) -> nn.Module:
    """Random-weight models: run a few random batches in train mode so BatchNorm statistics (and with
    them the activation ranges) are realistic, then return the model in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn((batch_size, *shape), generator=gen))
    return model.eval()


# ---- a small BERT-like encoder ------------------------------------------------------------------------

class EncoderLayer(nn.Module):
    """Post-LN transformer layer in BERT's layout: query/key/value projections, scaled dot-product attention
    written out (so export, fusion and quantization see plain MatMuls), output projection, residual +
    LayerNorm, GELU MLP, residual + LayerNorm. Attribute names follow Hugging Face's BertSelfAttention
    (num_attention_heads, attention_head_size), so head pruning and ONNX Runtime's attention fusion treat
    both alike."""

    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.num_attention_heads, self.attention_head_size = heads, dim // heads
        self.all_head_size = dim
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.ln1 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp)
        self.fc2 = nn.Linear(mlp, dim)
        self.ln2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape  # all_head_size may differ from the model width once heads are pruned
        h, d = self.num_attention_heads, self.attention_head_size
        q = self.query(x).reshape(b, t, h, d).transpose(1, 2)
        k = self.key(x).reshape(b, t, h, d).permute(0, 2, 3, 1)
        v = self.value(x).reshape(b, t, h, d).transpose(1, 2)
        att = torch.softmax((q @ k) / math.sqrt(d), dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, self.all_head_size)
        x = self.ln1(self.proj(y) + x)  # sublayer first, as in BERT (the order ONNX Runtime's fusion matches)
        return self.ln2(self.fc2(torch.nn.functional.gelu(self.fc1(x))) + x)


class TinyEncoder(nn.Module):
    """Token + position embeddings, `layers` encoder layers, mean pooling, a classification head."""

    def __init__(self, vocab: int = 32, dim: int = 64, heads: int = 4, layers: int = 2, mlp: int = 128,
                 max_len: int = 128, num_classes: int = 2) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.layers = nn.ModuleList([EncoderLayer(dim, heads, mlp) for _ in range(layers)])
        self.head = nn.Linear(dim, num_classes)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        x = self.tok(input_ids) + self.pos(torch.arange(t, device=input_ids.device))[None]
        for layer in self.layers:
            x = layer(x)
        return self.head(x.mean(1))


def tiny_encoder(**kwargs) -> TinyEncoder:
    return TinyEncoder(**kwargs)


def bert_mini(num_classes: int = 2, max_len: int = 512) -> TinyEncoder:
    """The encoder in BERT-mini's shape: 4 layers, hidden 256, 4 heads, MLP 1024, BERT's 30522-token vocabulary."""
    return TinyEncoder(vocab=30522, dim=256, heads=4, layers=4, mlp=1024, max_len=max_len, num_classes=num_classes)


def token_task(n: int = 2400, seq: int = 32, vocab: int = 32, seed: int = 0):
    """A synthetic sequence task an encoder learns in seconds: is token 1 more frequent than token 2?
    Yields one batch: {"input_ids": int64 [n, seq], "labels": int64 [n]}."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(n, seq))
    a, b = rng.integers(0, seq // 3, size=n), rng.integers(0, seq // 3, size=n)
    for i in range(n):
        pos = rng.permutation(seq)
        ids[i, pos[:a[i]]] = 1
        ids[i, pos[a[i]:a[i] + b[i]]] = 2
    labels = (a > b).astype(np.int64)
    yield {"input_ids": ids.astype(np.int64), "labels": labels}
