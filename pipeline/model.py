"""The seed's VGG-16-style cell classifier with a width multiplier.

13 conv 3×3 layers in the five VGG-16 blocks (2, 2, 3, 3, 3), each followed by batch norm,
ReLU and dropout (not after the last conv of a block, which is followed by 2×2 max-pool),
then 3 fully connected layers. Input: YUV, normalised, float ``(N, 3, 96, 96)``; output:
logits ``(N, K)`` (softmax is applied by the caller so temperature scaling can sit between).
The global model has K outputs; a local model has the same body and a 2-way head.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pipeline.imaging import rgb_to_yuv_u8

ARCH_ID = "vgg16bn-v1"
"""Stored in every checkpoint; a checkpoint with another id is refused."""

VGG16_BLOCKS: tuple[tuple[int, ...], ...] = ((64, 64), (128, 128), (256, 256, 256),
                                              (512, 512, 512), (512, 512, 512))
INPUT_SIZE = 96


class VGG(nn.Module):
    """VGG-16 body with batch norm and dropout; ``width`` scales every channel count.

    ``fc`` is the width of the two hidden fully connected layers. ``features(x)`` returns the
    penultimate activations ``(N, fc)`` used for unknown-cell detection.
    """

    def __init__(self, num_classes: int, width: float = 0.25, fc: int = 512,
                 conv_dropout: float = 0.3, fc_dropout: float = 0.5, init: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for block in VGG16_BLOCKS:
            for i, c in enumerate(block):
                c_out = max(8, int(round(c * width)))
                layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                           nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
                if i < len(block) - 1:  # kept at p=0 too, so weight names never shift
                    layers.append(nn.Dropout(conv_dropout))
                c_in = c_out
            layers.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*layers)
        side = INPUT_SIZE // 32
        self.neck = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(fc_dropout),
            nn.Linear(c_in * side * side, fc), nn.ReLU(inplace=True),
            nn.Dropout(fc_dropout),
            nn.Linear(fc, fc), nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(fc, num_classes)
        if init:
            self._kaiming()

    def _kaiming(self) -> None:
        """MSRA init, as in the seed."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out" if isinstance(m, nn.Conv2d)
                                        else "fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # A small output layer starts training near uniform probabilities (loss ≈ ln K).
        nn.init.normal_(self.head.weight, 0.0, 0.01)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.neck(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def fuse_for_inference(model: VGG) -> VGG:
    """Fold each batch norm into the convolution before it and drop the dropout layers, in
    place, for a model in eval mode. The outputs are unchanged (to float rounding) and
    inference is ~13% faster on CPU; the model can no longer be trained or saved as a
    checkpoint, so only a loaded classifier does this."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    layers = [m for m in model.body if not isinstance(m, nn.Dropout)]
    fused: list[nn.Module] = []
    for m in layers:
        if isinstance(m, nn.BatchNorm2d) and fused and isinstance(fused[-1], nn.Conv2d):
            fused[-1] = fuse_conv_bn_eval(fused[-1], m)
        else:
            fused.append(m)
    model.body = nn.Sequential(*fused)
    return model


def build(num_classes: int, width: float, fc: int, conv_dropout: float = 0.3,
          fc_dropout: float = 0.5, init: bool = True) -> VGG:
    return VGG(num_classes, width=width, fc=fc, conv_dropout=conv_dropout,
               fc_dropout=fc_dropout, init=init)


def to_input(crops: np.ndarray, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    """RGB uint8 crops ``(N, 96, 96, 3)`` to the normalised YUV float32 tensor
    ``(N, 3, 96, 96)`` the model takes (channels_last memory format)."""
    yuv = rgb_to_yuv_u8(crops)
    # Normalised in torch on the NHWC storage, which is already channels_last: one pass,
    # no copy (numpy took three, ~40% of a field's pre-processing).
    x = torch.from_numpy(yuv).permute(0, 3, 1, 2).float()
    x.sub_(torch.from_numpy(mean.astype(np.float32)).view(1, 3, 1, 1))
    return x.div_(torch.from_numpy(std.astype(np.float32)).view(1, 3, 1, 1))
