"""Localized Filtering-based Attention in a model of your own, in plain PyTorch.

``yuanlfa.LocalizedFiltering(hidden)`` is an ordinary nn.Module: x [seq, batch, hidden] ->
(filtered [seq, batch, hidden], state). As in Yuan 2.0, the queries and keys read the filtered
input and the values the unfiltered one. ``yuanlfa.localized_filtering(x, conv1_weight, ...)``
is the same computation as a function (Triton kernels on CUDA, plain torch elsewhere).

This script builds a two-block byte-level language model around it and trains it for a few
steps on a Python source file from the standard library (about 15 s on a laptop CPU):

    python examples/lfa_in_your_model.py [--steps 60]
"""

from __future__ import annotations

import argparse
import inspect
import json

import torch
import torch.nn.functional as F
from torch import nn

import yuanlfa


class LFABlock(nn.Module):
    """Pre-norm attention block with LFA in front of the Q/K projection, then an MLP."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.RMSNorm(hidden, eps=1e-6)
        self.lfa = yuanlfa.LocalizedFiltering(hidden)
        self.qk = nn.Linear(hidden, 2 * hidden, bias=False)
        self.v = nn.Linear(hidden, hidden, bias=False)
        self.o = nn.Linear(hidden, hidden, bias=False)
        self.norm2 = nn.RMSNorm(hidden, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [s, b, h] -> [s, b, h]."""
        s, b, h = x.shape
        xn = self.norm1(x)
        filtered, _ = self.lfa(xn)  # [s, b, h]: a causal filter over neighbouring tokens
        q, k = self.qk(filtered).chunk(2, dim=-1)
        q, k, v = (t.reshape(s, b, self.heads, -1).permute(1, 2, 0, 3) for t in (q, k, self.v(xn)))
        ctx = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [b, heads, s, d]
        x = x + self.o(ctx.permute(2, 0, 1, 3).reshape(s, b, h))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 256, hidden: int = 64, heads: int = 4, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        nn.init.normal_(self.embed.weight, std=0.02)  # tied to the output: keep logits small
        self.pos = nn.Parameter(torch.zeros(512, 1, hidden))
        self.blocks = nn.ModuleList(LFABlock(hidden, heads) for _ in range(layers))
        self.norm = nn.RMSNorm(hidden, eps=1e-6)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: [b, s] -> logits [b, s, vocab]."""
        x = self.embed(ids.t()) + self.pos[: ids.shape[1]]  # [s, b, h]
        for block in self.blocks:
            x = block(x)
        return (self.norm(x) @ self.embed.weight.t()).transpose(0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    torch.manual_seed(0)
    data = torch.tensor(list(inspect.getsource(json.decoder).encode()), dtype=torch.long)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters, {len(data):,} bytes")
    for step in range(1, args.steps + 1):
        starts = torch.randint(0, len(data) - 129, (16,))
        batch = torch.stack([data[i : i + 129] for i in starts])  # [16, 129]
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 1 or step % 10 == 0:
            print(f"step {step:3d} | loss {loss.item():.3f}")

    # The module and the function compute the same filter.
    lfa = model.blocks[0].lfa
    x = torch.randn(10, 2, 64)
    out, _ = yuanlfa.localized_filtering(
        x, lfa.conv1.weight, lfa.conv1.bias, lfa.conv2.weight, lfa.conv2.bias, lfa.norm.weight
    )
    torch.testing.assert_close(out, lfa(x)[0])
    print("yuanlfa.localized_filtering == LocalizedFiltering: ok")


if __name__ == "__main__":
    main()
