"""A real port: Hugging Face GPT-2 (A) vs a hand-written GPT-2 in plain nn.Linear (B).

GPT-2's ``Conv1D`` stores its weight as (in, out), the transpose of ``nn.Linear``; the port
renames every module. Weights are copied from A; one batch is compared, forward only, through
``--map auto``: no divergence beyond rounding, and a planted bug (ReLU where GPT-2 has GELU) is
named at A's module.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import graddiff

transformers = pytest.importorskip("transformers")

V, D, H, L, T = 32, 16, 2, 2, 8


class Block(nn.Module):
    def __init__(self, act: str) -> None:
        super().__init__()
        self.norm1, self.qkv, self.out = nn.LayerNorm(D), nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.norm2, self.up, self.down = nn.LayerNorm(D), nn.Linear(D, 4 * D), nn.Linear(4 * D, D)
        self.gelu = nn.GELU(approximate="tanh") if act == "gelu" else nn.ReLU()

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, H, D // H).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(D // H)
        att = att.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, D)
        x = x + self.out(y)
        return x + self.down(self.gelu(self.up(self.norm2(x))))


class MyGPT(nn.Module):
    def __init__(self, act: str = "gelu") -> None:
        super().__init__()
        self.tokens, self.positions = nn.Embedding(V, D), nn.Embedding(T, D)
        self.blocks = nn.ModuleList(Block(act) for _ in range(L))
        self.norm = nn.LayerNorm(D)

    def forward(self, ids):
        x = self.tokens(ids) + self.positions(torch.arange(ids.shape[1]))
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x) @ self.tokens.weight.T  # tied output embedding, as GPT-2


@torch.no_grad()
def _copy(hf, mine: MyGPT) -> None:
    tr = hf.transformer
    mine.tokens.weight.copy_(tr.wte.weight)
    mine.positions.weight.copy_(tr.wpe.weight[:T])
    for h, b in zip(tr.h, mine.blocks):
        for src, dst in ((h.ln_1, b.norm1), (h.ln_2, b.norm2), (tr.ln_f, mine.norm)):
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)
        for src, dst in (
            (h.attn.c_attn, b.qkv),
            (h.attn.c_proj, b.out),
            (h.mlp.c_fc, b.up),
            (h.mlp.c_proj, b.down),
        ):
            dst.weight.copy_(src.weight.T)  # Conv1D: (in, out)
            dst.bias.copy_(src.bias)


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    cfg = transformers.GPT2Config(
        n_layer=L,
        n_embd=D,
        n_head=H,
        vocab_size=V,
        n_positions=16,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(1))
    out = {}
    for tag, model in (("hf", hf), ("mine", MyGPT()), ("relu", MyGPT("relu"))):
        if tag != "hf":
            _copy(hf, model)
        out[tag] = str(d / f"{tag}.h5")
        with graddiff.trace(model, out[tag], forward_only=True):
            with torch.no_grad():
                model(ids)
    return out


def test_hf_port_compares_clean_through_map_auto(traces):
    rep = graddiff.compare(traces["hf"], traces["mine"], name_map="auto")
    assert rep.exit_code == 0, (rep.first, rep.notes)
    names = rep.structure["name_map"]
    assert names["renamed"] > 0 and names["transformed"] >= 4 * L  # the Conv1D weights


def test_hf_port_bug_named_at_the_hf_module(traces):
    rep = graddiff.compare(traces["hf"], traces["relu"], name_map="auto")
    assert rep.exit_code == 1
    assert (rep.first.kind, rep.first.name, rep.first.step) == (
        "activation",
        "transformer.h.0.mlp.act",
        0,
    )
