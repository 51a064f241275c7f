"""Small teacher/student networks for the distillation demo (``python -m ckd_ext.demos.classify``).

* Digits (scikit-learn's 8 x 8 handwritten digits, 10 classes):
  ``digits_teacher`` is a small CNN (~0.1 M parameters); ``digits_student`` is a deliberately narrow MLP
  (a 10-unit bottleneck, ~760 parameters), so the teacher is clearly better than the student trained
  alone and there is a gap for distillation to close.
* Language modelling (``python -m ckd_ext.demos.lm``): ``CausalLM``, a small pre-norm causal Transformer whose
  forward returns the last hidden states; its ``head`` (``nn.Linear(width, vocab, bias=False)``) is applied by the
  loss (the fused-linear losses take the hidden states and ``head.weight``).
* CIFAR-100: ``resnet32x4`` -> ``resnet8x4``, the standard pair of the CRD / mdistiller benchmarks (CIFAR
  ResNets with 4x wider channels, 32-64-128-256; ~7.4 M and ~1.2 M parameters).

Only ``torch`` is needed here.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["digits_teacher", "digits_student", "resnet8x4", "resnet32x4", "build_model", "MODELS", "CausalLM"]


# ----------------------------------------------------------------------------------------- language model
class CausalLM(nn.Module):
    """Token and position embeddings, `layers` pre-norm Transformer blocks (4 heads where the width allows, causal
    self-attention, a 4x MLP), a final LayerNorm; forward returns the hidden states (B, L, width)."""

    def __init__(self, vocab: int, width: int, layers: int, context: int):
        super().__init__()
        heads = 4 if width % 4 == 0 else 1
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(context, width)
        block = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        nn.init.normal_(self.tokens.weight, std=0.02)
        nn.init.normal_(self.positions.weight, std=0.02)
        nn.init.normal_(self.head.weight, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        length = ids.shape[1]
        x = self.tokens(ids) + self.positions(torch.arange(length, device=ids.device))
        causal = nn.Transformer.generate_square_subsequent_mask(length, device=ids.device)
        return self.norm(self.blocks(x, mask=causal, is_causal=True))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# --------------------------------------------------------------------------------------------- digits
class DigitsCNN(nn.Module):
    """Two 3x3 conv layers and a hidden linear layer on the 1 x 8 x 8 digit images."""

    def __init__(self, num_classes: int = 10, width: int = 32, hidden: int = 128):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * 16, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.view(-1, 1, 8, 8)))


class DigitsMLP(nn.Module):
    """A flat MLP with a narrow hidden layer: 64 -> hidden -> num_classes."""

    def __init__(self, num_classes: int = 10, hidden: int = 10):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def digits_teacher(num_classes: int = 10) -> nn.Module:
    return DigitsCNN(num_classes)


def digits_student(num_classes: int = 10) -> nn.Module:
    return DigitsMLP(num_classes)


# ------------------------------------------------------------------------------------- CIFAR ResNets
def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = _conv3x3(cin, cout, stride), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = _conv3x3(cout, cout), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """The CIFAR ResNet of the CRD / mdistiller code: depth = 6n + 2, three stages of n BasicBlocks."""

    def __init__(self, depth: int, widths=(32, 64, 128, 256), num_classes: int = 100):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2, got {depth}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(_conv3x3(3, widths[0]), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        layers, cin = [], widths[0]
        for stage, cout in enumerate(widths[1:]):
            for b in range(n):
                layers.append(BasicBlock(cin, cout, stride=2 if (stage > 0 and b == 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def resnet8x4(num_classes: int = 100) -> nn.Module:
    return CifarResNet(8, num_classes=num_classes)


def resnet32x4(num_classes: int = 100) -> nn.Module:
    return CifarResNet(32, num_classes=num_classes)


MODELS = {
    "digits_teacher": digits_teacher,
    "digits_student": digits_student,
    "resnet32x4": resnet32x4,
    "resnet8x4": resnet8x4,
}


def build_model(name: str, num_classes: int) -> nn.Module:
    try:
        return MODELS[name](num_classes=num_classes)
    except KeyError:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}") from None
