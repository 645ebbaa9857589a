"""One tiny transformer written two ways, for the name-mapping tests (issue 15).

``RefModel`` (A) uses nn.Linear and separate q/k/v projections under ``blocks.{i}.attn``;
``PortModel`` (B) fuses q/k/v into one ``qkv`` projection, uses a custom linear that stores its
weight transposed (``x @ W + b``), and names everything differently. ``copy_weights`` makes B
compute exactly A's function; the ``bug`` argument of PortModel plants one porting bug.
"""

from __future__ import annotations

import math

import torch
from torch import nn

V, D, H, T, LAYERS = 32, 16, 2, 6, 2


class RefAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.out_proj = nn.Linear(D, D)

    def forward(self, x):
        b, t, _ = x.shape

        def heads(y):
            return y.view(b, t, H, D // H).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(D // H)
        y = att.softmax(-1) @ v
        return self.out_proj(y.transpose(1, 2).reshape(b, t, D))


class RefMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class RefBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(D), RefAttention()
        self.ln2, self.mlp = nn.LayerNorm(D), RefMLP()

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class RefModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.blocks = nn.ModuleList(RefBlock() for _ in range(LAYERS))
        self.ln_f, self.head = nn.LayerNorm(D), nn.Linear(D, V)

    def forward(self, ids):
        x = self.embed(ids)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


class TLinear(nn.Module):
    """A linear layer that stores its weight as (in, out): ``x @ W + b``."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.randn(n_in, n_out) / math.sqrt(n_in))
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        return x @ self.W + self.b


class PortAttention(nn.Module):
    def __init__(self, bug: str) -> None:
        super().__init__()
        self.qkv, self.proj, self.bug = nn.Linear(D, 3 * D), TLinear(D, D), bug

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, H, D // H).permute(2, 0, 3, 1, 4)
        att = q @ k.transpose(-1, -2)
        if self.bug != "scale":  # the planted bug: the 1/sqrt(d_head) scale left out
            att = att / math.sqrt(D // H)
        y = att.softmax(-1) @ v
        return self.proj(y.transpose(1, 2).reshape(b, t, D))


class PortFF(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.act, self.down = TLinear(D, 4 * D), nn.GELU(), TLinear(4 * D, D)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


class PortLayer(nn.Module):
    def __init__(self, bug: str) -> None:
        super().__init__()
        eps = 1e-2 if bug == "eps" else 1e-5  # the planted bug: another LayerNorm eps
        self.norm_a, self.attention = nn.LayerNorm(D, eps=eps), PortAttention(bug)
        self.norm_b, self.ff = nn.LayerNorm(D), PortFF()

    def forward(self, x):
        x = x + self.attention(self.norm_a(x))
        return x + self.ff(self.norm_b(x))


class PortModel(nn.Module):
    def __init__(self, bug: str = "") -> None:
        super().__init__()
        self.tok = nn.Embedding(V, D)
        self.layers = nn.ModuleList(PortLayer(bug) for _ in range(LAYERS))
        self.final_norm, self.lm_head = nn.LayerNorm(D), TLinear(D, V)

    def forward(self, ids):
        x = self.tok(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.final_norm(x))


@torch.no_grad()
def copy_weights(ref: RefModel, port: PortModel, bug: str = "") -> None:
    """Make ``port`` compute ``ref``'s function. bug="transpose": one weight copied untransposed."""
    port.tok.weight.copy_(ref.embed.weight)
    for blk, lay in zip(ref.blocks, port.layers):
        for a, b in ((blk.ln1, lay.norm_a), (blk.ln2, lay.norm_b)):
            b.weight.copy_(a.weight)
            b.bias.copy_(a.bias)
        at = blk.attn
        lay.attention.qkv.weight.copy_(
            torch.cat([at.q_proj.weight, at.k_proj.weight, at.v_proj.weight])
        )
        lay.attention.qkv.bias.copy_(torch.cat([at.q_proj.bias, at.k_proj.bias, at.v_proj.bias]))
        pairs = (
            (at.out_proj, lay.attention.proj),
            (blk.mlp.fc1, lay.ff.up),
            (blk.mlp.fc2, lay.ff.down),
        )
        for lin, tl in pairs:
            tl.W.copy_(lin.weight.T)
            tl.b.copy_(lin.bias)
    if bug == "transpose":  # the planted bug: a square weight copied without its transpose
        port.layers[1].attention.proj.W.copy_(ref.blocks[1].attn.out_proj.weight)
    port.final_norm.weight.copy_(ref.ln_f.weight)
    port.final_norm.bias.copy_(ref.ln_f.bias)
    port.lm_head.W.copy_(ref.head.weight.T)
    port.lm_head.b.copy_(ref.head.bias)


def batches(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(0, V, (4, T), generator=g), torch.randint(0, V, (4, T), generator=g))
        for _ in range(n)
    ]


def train(model: nn.Module, path, steps: int = 2, lr: float = 0.01, forward_only: bool = False):
    """A few SGD steps (same data for both models), traced into ``path``."""
    import graddiff

    opt = torch.optim.SGD(model.parameters(), lr=lr)
    with graddiff.trace(model, path):
        for ids, target in batches(steps):
            loss = nn.functional.cross_entropy(model(ids).reshape(-1, V), target.reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return str(path)


def pair(tmp_path, bug: str = "", steps: int = 2):
    """Trace A (RefModel) and B (PortModel with weights copied, one bug planted)."""
    torch.manual_seed(0)
    ref = RefModel()
    port = PortModel(bug)
    copy_weights(ref, port, bug)
    a = train(ref, tmp_path / "a.h5", steps)
    b = train(port, tmp_path / f"b{bug}.h5", steps)
    return a, b
