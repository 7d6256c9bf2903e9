"""A linear product over one of a model's large weights, which on the CPU
reads a copy of the weight packed once in oneDNN's blocked layout.

PyTorch's float32 linear on the CPU hands the product to MKL, which copies the
weight into its own blocked layout in every call. For the few rows of a
decode step that copy costs more than the arithmetic. oneDNN, given the
weight already packed (`torch.ops.mkldnn._reorder_linear_weight`, what
torch.compile's freezing uses), skips it. Measured on a 2-core VM (30
distinct weights, so that none stays in cache; F.linear / packed):

  Llama's gate+up [M, 576] x [576, 3072], us:  M=1 279/374  4: 550/354  8: 681/416  32: 1009/663
  the default model's LM head [M, 576] x [576, 49152], ms:  M=1 4.2/4.8  8: 15.3/5.6  32: 13.2/9.5
  (the smaller q/k/v, o and down projections: within 10% either way, so they stay F.linear)

So the packed copy serves products of at least MIN_ROWS rows: decode steps
of several rows and prefills. Its cost is a second copy of those weights
(the default model: 325 MB); `PTSERVE_CPU_PACKED_WEIGHTS=false` turns it
off. Its sums run in another order than MKL's, so results differ from
F.linear's in the last bits, as between any two batch shapes.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

MIN_ROWS = 4


def packable(weight: torch.Tensor) -> bool:
    """A float32 weight on a CPU with oneDNN."""
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()


class Linear:
    """x -> x @ weight.T + bias, like F.linear."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, packed: bool = True):
        """packed: keep a packed copy where `packable` (else this is F.linear)."""
        self.weight = weight
        self.bias = bias
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 32) if packed and packable(weight) else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None or x.numel() < MIN_ROWS * x.shape[-1]:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
