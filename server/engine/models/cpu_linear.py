"""A linear product over one of a model's large weights, which on the CPU in
float32 reads copies of the weight packed once, each where it was measured
to be the fastest.

PyTorch's float32 linear on the CPU hands the product to MKL, which copies the
weight into its own blocked layout in every call. For the few rows of a
decode step that copy costs more than the arithmetic. Two libraries take a
weight packed in advance:

- MKL's packed GEMM (`torch.ops.mkl._mkl_reorder_linear_weight`), for products
  of exactly the row count it was packed for, MKL_ROWS: a full decode step.
  For a contiguous input (a decode step's are), its results are F.linear's
  at that row count, bit for bit (the same kernels).
- oneDNN's blocked layout (`torch.ops.mkldnn._reorder_linear_weight`, what
  torch.compile's freezing uses), for products of at least MIN_ROWS rows.

Measured on a 2-core VM (Intel Xeon, AVX-512), 30 distinct weights so that
none stays in cache; F.linear / oneDNN / MKL packed for 32 rows, us:

  rows                        4          8          16         24         32
  q/k/v [576 -> 960]       138/131    167/171    209/207    238/257    265/358/240
  o [576 -> 576]            72/79      88/107    110/131    128/143    141/171/134
  gate+up [576 -> 3072]    608/434    813/491    812/570    917/677    949/743/661
  down [1536 -> 576]       209/255    259/305    354/367    412/413    440/461/386
  LM head [576 -> 49152]  9811/5185 15406/6122 10534/7543 11943/9082 13492/10657/9882  (ms/1000)

In a whole decode step of the default model at 32 rows, MKL's packed products
for every weight took the step from 96 to 84 ms (alternating runs in one
process). So every weight keeps an MKL copy, where steps can have MKL_ROWS
rows (`max_rows`: the engine's max_running), and the two where oneDNN wins
at other row counts (`dnn=True`: the MLP's gate/up and the LM head) keep a
oneDNN copy too. The cost is memory: one more copy of every layer weight and
of the LM head, and a second of the gate/up and LM head weights. On the
default model (513 MiB of weights) the MKL copies are 515 MiB and the oneDNN
copies 316 MiB, and building them added 966 MiB of resident memory (1.9x
the weights); MKL also reserves 2 to 9 times each weight's size of address
space, not resident.
`PTSERVE_CPU_PACKED_WEIGHTS=false` turns both off. oneDNN's
sums run in another order than MKL's, so its results differ from F.linear's
in the last bits, as between any two batch shapes.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

MIN_ROWS = 4
MKL_ROWS = 32


def packable(weight: torch.Tensor) -> bool:
    """A float32 weight on a CPU."""
    return weight.device.type == "cpu" and weight.dtype == torch.float32


class Linear:
    """x -> x @ weight.T + bias, like F.linear."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, packed: bool = True,
                 dnn: bool = False, max_rows: int = MKL_ROWS):  # fmt: skip
        """packed: keep MKL's packed copy where `packable` and products of
        MKL_ROWS rows can happen (max_rows: the most a decode step has); dnn:
        also keep oneDNN's, for products of MIN_ROWS rows or more. Neither: F.linear."""
        self.weight = weight
        self.bias = bias
        packed = packed and packable(weight)
        self.mkl = None
        if packed and max_rows >= MKL_ROWS and torch.backends.mkl.is_available():
            self.mkl = torch.ops.mkl._mkl_reorder_linear_weight(weight, MKL_ROWS)
        self.dnn = None
        if packed and dnn and torch.backends.mkldnn.is_available():
            self.dnn = torch.ops.mkldnn._reorder_linear_weight(weight, MKL_ROWS)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if self.mkl is not None and rows == MKL_ROWS:
            return torch.ops.mkl._mkl_linear(x, self.mkl, self.weight, self.bias, MKL_ROWS)
        if self.dnn is not None and rows >= MIN_ROWS:
            return torch.ops.mkldnn._linear_pointwise(x, self.dnn, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
