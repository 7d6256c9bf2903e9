"""Prompt encoders: what produces the m prompt vectors during training.

- `lstm`: the P-tuning paper's encoder: a table of m input vectors -> 2-layer
  bidirectional LSTM -> 2-layer MLP. The LSTM ties the vectors together, which
  the paper found trains more stably than free vectors.
- `mlp`: the table -> 2-layer MLP (each vector on its own).
- `none`: plain prompt tuning: the table itself is the prompt.

The LSTM/MLP output, times the starting vectors' standard deviation, is added
to the table (a residual), and the MLP's last layer starts at zero:
- before any step every encoder gives exactly its starting vectors, so a
  prompt started from real words (`--from-prompt`) is that text prompt at
  epoch 0;
- the networks work in units of the model's own embedding scale, so one
  learning rate suits models whose embeddings differ in size (MiniLM's rows
  have norm ~1.7, where Adam steps of 1e-2 on an unscaled MLP pushed rows past
  1000 times that within a few epochs).

After training the encoder runs once and only its [m, H] output is kept.
"""

from __future__ import annotations

from enum import Enum

import torch
from torch import nn


class EncoderKind(str, Enum):
    LSTM = "lstm"
    MLP = "mlp"
    NONE = "none"


class PromptEncoder(nn.Module):
    def __init__(self, kind: EncoderKind | str, init: torch.Tensor):
        """init: [m, H] starting vectors (e.g. embeddings of random vocabulary tokens)."""
        super().__init__()
        self.kind = EncoderKind(kind)
        m, H = init.shape
        self.table = nn.Parameter(init.detach().clone().float())  # [m, H]
        self.scale = float(init.float().std()) if init.numel() > 1 else 1.0  # the embeddings' scale
        if self.kind is EncoderKind.LSTM:
            self.lstm = nn.LSTM(H, H // 2, num_layers=2, bidirectional=True, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(2 * (H // 2), H), nn.ReLU(), nn.Linear(H, H))
        elif self.kind is EncoderKind.MLP:
            self.mlp = nn.Sequential(nn.Linear(H, H), nn.ReLU(), nn.Linear(H, H))
        if self.kind is not EncoderKind.NONE:
            nn.init.zeros_(self.mlp[-1].weight)  # the residual starts at zero: output == init
            nn.init.zeros_(self.mlp[-1].bias)

    def forward(self) -> torch.Tensor:
        """-> [m, H] prompt vectors."""
        if self.kind is EncoderKind.NONE:
            return self.table
        x = self.table
        if self.kind is EncoderKind.LSTM:
            x = self.lstm(x.unsqueeze(0))[0].squeeze(0)  # [m, 2*(H//2)]
        return self.table + self.scale * self.mlp(x)
