"""8-bit integer inference for a classifier's convolutional body.

The body is ~95% of a cell's inference cost. On x86 CPUs with VNNI its int8 convolutions
run about twice as fast as bf16 (0.61 vs 1.31 ms per cell at batch 32 on 2 cores, measured
in tests/bench), for a change of under 0.1 point on the PBC test split (MODEL_CARD).

``calibrate_int8(body, batches)`` observes the activations of a batch-norm-fused body
(``pipeline.model.fuse_for_inference``) on real, prepared inputs and returns the quantized
state: per-channel int8 weights, and per-layer activation scales. The checkpoint stores it,
so loading needs no calibration data: ``int8_body(body, state)`` rebuilds the quantized
module in a few tens of milliseconds.

torch's eager-mode quantization is used because it runs real int8 kernels (fbgemm/oneDNN)
without ``torch.compile``; its successor (torchao pt2e) needs a compiler at load time.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable

import torch
from torch import nn

ENGINE = "x86"


def int8_supported() -> bool:
    """The CPU build has the x86 quantized engine (fbgemm + oneDNN)."""
    return ENGINE in torch.backends.quantized.supported_engines


def _observed(body: nn.Sequential) -> nn.Sequential:
    """``body`` (fused: conv, ReLU, max-pool; no batch norm or dropout) wrapped with
    quantize/dequantize stubs, each conv fused with its ReLU, observers attached."""
    import torch.ao.quantization as tq

    torch.backends.quantized.engine = ENGINE
    layers = list(copy.deepcopy(body))
    for i, m in enumerate(layers):
        if isinstance(m, (nn.BatchNorm2d, nn.Dropout)):
            raise ValueError(f"layer {i} is {type(m).__name__}: fuse the body first")
    seq = nn.Sequential(tq.QuantStub(), *layers, tq.DeQuantStub()).eval()
    pairs = [[str(i), str(i + 1)] for i, m in enumerate(seq)
             if isinstance(m, nn.Conv2d) and isinstance(seq[i + 1], nn.ReLU)]
    with warnings.catch_warnings():
        # torch marks eager quantization deprecated in favour of torchao (see module doc).
        warnings.simplefilter("ignore")
        tq.fuse_modules(seq, pairs, inplace=True)
        seq.qconfig = tq.get_default_qconfig(ENGINE)
        tq.prepare(seq, inplace=True)
    return seq


def _converted(seq: nn.Sequential) -> nn.Sequential:
    import torch.ao.quantization as tq

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tq.convert(seq, inplace=True)


@torch.inference_mode()
def calibrate_int8(body: nn.Sequential, batches: Iterable[torch.Tensor]
                   ) -> dict[str, torch.Tensor]:
    """Quantized state of a fused ``body`` after observing ``batches`` of model input
    (float ``(N, 3, 96, 96)``, prepared exactly as at inference). Raises ValueError when
    no batch was given."""
    seq = _observed(body)
    n = 0
    for x in batches:
        seq(x.float())
        n += len(x)
    if n == 0:
        raise ValueError("int8 calibration needs at least one input batch")
    return _converted(seq).state_dict()


def int8_body(body: nn.Sequential, state: dict[str, torch.Tensor]) -> nn.Sequential:
    """The int8 module for a fused ``body`` from ``calibrate_int8``'s state: float input,
    float output, same shapes as ``body``. Raises RuntimeError when ``state`` does not fit."""
    seq = _converted(_observed(body))
    # Quantized layers load weights of any shape without complaint: check them first.
    expect = seq.state_dict()
    bad = sorted(set(expect) ^ set(state)) or [
        k for k, v in expect.items() if getattr(v, "shape", None) != getattr(state[k], "shape", None)]
    if bad:
        raise RuntimeError(f"int8 state has other layers or shapes than the model ({bad[0]})")
    seq.load_state_dict(state)
    for i, m in enumerate(seq):
        if isinstance(m, nn.MaxPool2d) and _is_2x2(m):
            seq[i] = ByteMaxPool2x2()
    return seq


def _is_2x2(m: nn.MaxPool2d) -> bool:
    two = (2, (2, 2))
    return (m.kernel_size in two and m.stride in two and m.padding in (0, (0, 0))
            and m.dilation in (1, (1, 1)) and not m.ceil_mode and not m.return_indices)


class ByteMaxPool2x2(nn.Module):
    """2×2 max-pool of a quint8 channels_last tensor, computed on its bytes.

    torch's quantized max-pool runs ~10× slower on 16 channels than on 32 (measured: 4.7 vs
    0.4 ms for the same 4.7 MB at batch 32), and the first block of a ¼-width VGG has 16. The
    maximum of the 8-bit codes is the code of the maximum (one scale and zero point per
    tensor), so the result is bit-identical (tested). From 32 channels on torch's kernel is
    the faster (measured per layer of the shipped model), and it takes anything else too.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if (c >= 32 or x.dtype != torch.quint8 or x.qscheme() != torch.per_tensor_affine
                or h % 2 or w % 2 or not x.is_contiguous(memory_format=torch.channels_last)):
            return nn.functional.max_pool2d(x, 2)
        codes = torch.empty(0, dtype=torch.uint8).set_(
            x.untyped_storage(), x.storage_offset(), (n, h // 2, 2, w // 2, 2, c),
            (h * w * c, 2 * w * c, w * c, 2 * c, c, 1))
        m = torch.maximum(torch.maximum(codes[:, :, 0, :, 0], codes[:, :, 0, :, 1]),
                          torch.maximum(codes[:, :, 1, :, 0], codes[:, :, 1, :, 1]))
        return torch._make_per_tensor_quantized_tensor(m.permute(0, 3, 1, 2), x.q_scale(),
                                                       x.q_zero_point())
