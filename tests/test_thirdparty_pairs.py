"""Pairs of runs shaped after third-party training code (pytorch/examples' imagenet,
word_language_model, dcgan; docs/diagnoses.md, "Checked on third-party code"), shrunk to a
tiny model and a few steps, each with one realistic change. The oracle is the test: it knows
the change, the step where it first acts, and the cause the differ must name.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graddiff


def _first(report):
    return report.first or report.first_bitwise


def _causes(report) -> list[str]:
    return [c.cause for c in report.diagnosis]


# -- a small weight decay: the parameters part below the tolerance, a later record diverges --


def _near_fit_run(path, wd: float) -> None:
    """SGD on targets the initial model almost fits: the gradient is the small residual, so a
    parameter change far below the tolerance (lr x wd = 1e-5) moves it by more than 1e-3."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    x = torch.randn(32, 8)
    with torch.no_grad():
        y = net(x) + 1e-3 * torch.randn(32, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, weight_decay=wd)
    with graddiff.trace(net, path, values="full"):
        for _ in range(3):
            opt.zero_grad()
            F.mse_loss(net(x), y).backward()
            opt.step()


def test_small_weight_decay_named_when_a_later_record_diverges_first(tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    _near_fit_run(a, 0.0)
    _near_fit_run(b, 1e-4)
    r = graddiff.compare(a, b)
    assert r.diverged and r.first.step == 1
    assert r.first.kind != "param"  # the parameters differ by 1e-5 only: below the tolerance
    assert r.first_bitwise.kind == "param" and r.first_bitwise.step == 1
    assert r.diagnosis[0].cause == "weight_decay", _causes(r)
    text = " ".join(r.diagnosis[0].evidence)
    assert "below the tolerance" in text and "update of step 0" in text


# -- tied vs untied embeddings (word_language_model --tied) -----------------------------------


class _TinyLM(nn.Module):
    """word_language_model's RNNModel, shrunk: the tie and its initialisation order."""

    def __init__(self, tie: bool, ntoken: int = 30, nhid: int = 8) -> None:
        super().__init__()
        self.encoder = nn.Embedding(ntoken, nhid)
        self.rnn = nn.LSTM(nhid, nhid)
        self.decoder = nn.Linear(nhid, ntoken)
        if tie:
            self.decoder.weight = self.encoder.weight
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    def forward(self, tokens):
        out, _ = self.rnn(self.encoder(tokens))
        return F.log_softmax(self.decoder(out), dim=-1)


def _lm_run(path, tie: bool) -> None:
    torch.manual_seed(0)
    model = _TinyLM(tie)
    data = torch.randint(0, 30, (6, 2), generator=torch.Generator().manual_seed(1))
    with graddiff.trace(model, path, values="full"):
        for _ in range(2):
            model.zero_grad()
            out = model(data[:-1])
            F.nll_loss(out.reshape(-1, 30), data[1:].reshape(-1)).backward()
            for p in model.parameters():
                p.data.add_(p.grad, alpha=-1.0)


def test_tied_weights_named_when_the_shared_tensor_diverges_first(tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    _lm_run(a, tie=False)
    _lm_run(b, tie=True)
    r = graddiff.compare(a, b)
    # the tied tensor holds the decoder's initialisation: encoder.weight differs at step 0
    assert r.first.step == 0 and (r.first.kind, r.first.name) == ("param", "encoder.weight")
    c = r.diagnosis[0]
    assert c.cause == "tied_weights", _causes(r)
    assert "decoder.weight" in c.title and "in B" in c.title
    assert any("keeps the initialisation written last" in e for e in c.evidence)


# -- label smoothing (imagenet/main.py's CrossEntropyLoss) ---------------------------------------


def _cls_run(path, smoothing: float, weight=None) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5))
    crit = nn.CrossEntropyLoss(label_smoothing=smoothing, weight=weight)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    with graddiff.trace(net, path, values="full"):
        for _ in range(2):
            x, y = torch.randn(16, 8, generator=g), torch.randint(0, 5, (16,), generator=g)
            opt.zero_grad()
            crit(net(x), y).backward()
            opt.step()


@pytest.mark.parametrize("change", ["smoothing", "class_weight"])
def test_loss_function_named_from_the_output_gradient(tmp_path, change):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    _cls_run(a, 0.0)
    if change == "smoothing":
        _cls_run(b, 0.1)
    else:
        _cls_run(b, 0.0, weight=torch.tensor([1.0, 1.0, 1.0, 1.0, 1.01]))
    r = graddiff.compare(a, b)
    f = _first(r)
    assert f.step == 0 and f.kind == "grad_output" and f.name == "2", (f.kind, f.name)
    assert r.diagnosis[0].cause == "loss_function", _causes(r)
    assert "2 (Linear)" in r.diagnosis[0].title


# -- data order vs augmentation (imagenet/main.py's DataLoader and transforms) -------------------


class _Images(torch.utils.data.Dataset):
    """Eight fixed images; ``flip``: a RandomHorizontalFlip drawn from torch's global RNG."""

    def __init__(self, flip: bool) -> None:
        self.x = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(3))
        self.flip = flip

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i):
        img = self.x[i]
        if self.flip and torch.rand(()) < 0.5:
            img = img.flip(-1)
        return img, i % 3


def _data_run(path, *, flip: bool = False, shuffle_seed: int = 0) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    loader = torch.utils.data.DataLoader(
        _Images(flip),
        batch_size=4,
        shuffle=True,
        generator=torch.Generator().manual_seed(shuffle_seed),
    )
    with graddiff.trace(net, path, values="full"):
        for _ in range(2):  # two epochs: every sample recurs once
            for x, y in loader:
                opt.zero_grad()
                F.cross_entropy(net(x), y).backward()
                opt.step()


def test_augmentation_is_not_called_data_order(tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    _data_run(a)
    _data_run(b, flip=True)
    r = graddiff.compare(a, b)
    f = _first(r)
    assert f.kind == "input" and r.diagnosis[0].cause == "different_inputs"
    title = r.diagnosis[0].title
    assert "augmentation" in title and "data order" not in title, title


def test_shuffle_seed_is_data_order(tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    _data_run(a)
    _data_run(b, shuffle_seed=7)
    r = graddiff.compare(a, b)
    assert r.first.kind == "input" and r.first.step == 0
    assert r.diagnosis[0].cause == "different_inputs"
    assert "data order" in r.diagnosis[0].title, r.diagnosis[0].title


def _gan_like_run(path, g_seed: int) -> None:
    """A discriminator fed real data (call 0) and a generator's output (call 1); only the
    discriminator is traced, and the generator differs between the runs."""
    torch.manual_seed(g_seed)
    gen = nn.Linear(4, 6)
    torch.manual_seed(0)
    disc = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(disc.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    with graddiff.trace(disc, path, values="full"):
        for _ in range(2):
            real, z = torch.randn(4, 6, generator=g), torch.randn(4, 4, generator=g)
            opt.zero_grad()
            loss = disc(real).mean() - disc(gen(z).detach()).mean()
            loss.backward()
            opt.step()


def test_input_from_another_model_is_named_upstream(tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    _gan_like_run(a, 1)
    _gan_like_run(b, 2)
    r = graddiff.compare(a, b)
    assert r.first.kind == "input" and r.first.step == 0 and r.first.call == 1
    c = r.diagnosis[0]
    assert c.cause == "different_inputs"
    assert "other calls at this step agrees" in c.title, c.title


# -- clipping in a loop that updates by hand (word_language_model's train()) ---------------------


def _manual_clip_run(path, clip) -> None:
    torch.manual_seed(0)
    model = _TinyLM(tie=False)
    data = torch.randint(0, 30, (21, 2), generator=torch.Generator().manual_seed(1))
    with graddiff.trace(model, path, values="full"):
        for i in range(0, 20, 5):
            model.zero_grad()
            out = model(data[i : i + 5])
            F.nll_loss(out.reshape(-1, 30), data[i + 1 : i + 6].reshape(-1)).backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            for p in model.parameters():
                p.data.add_(p.grad, alpha=-2.0)


def test_clipping_after_the_recorded_gradients_is_not_a_schedule(tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    _manual_clip_run(a, 0.05)
    _manual_clip_run(b, None)
    r = graddiff.compare(a, b)
    assert r.first.kind == "param" and r.first.step == 1
    c = r.diagnosis[0]
    assert c.cause == "grad_clipping", _causes(r)
    assert "in A" in c.title and "max_norm 0.05" in c.title, c.title


# -- a swapped layer type (word_language_model --model GRU; an activation changed) ---------------


class _RNNLM(nn.Module):
    def __init__(self, rnn: str) -> None:
        super().__init__()
        self.rnn = getattr(nn, rnn)(8, 8)  # built first: its random draws shift later layers
        self.encoder = nn.Embedding(30, 8)
        self.decoder = nn.Linear(8, 30)

    def forward(self, tokens):
        out, _ = self.rnn(self.encoder(tokens))
        return self.decoder(out)


def _swap_run(path, *, rnn: str = "LSTM", act: str = "ReLU") -> None:
    torch.manual_seed(0)
    if act == "none":
        model = _RNNLM(rnn)
        data = torch.randint(0, 30, (6, 2), generator=torch.Generator().manual_seed(1))
        batch = lambda: (data[:-1], data[1:])  # noqa: E731
    else:
        model = nn.Sequential(nn.Linear(8, 16), getattr(nn, act)(), nn.Linear(16, 4))
        xs = torch.randn(8, 8, generator=torch.Generator().manual_seed(1))
        ys = torch.randint(0, 4, (8,), generator=torch.Generator().manual_seed(2))
        batch = lambda: (xs, ys)  # noqa: E731
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with graddiff.trace(model, path, values="full"):
        for _ in range(2):
            x, y = batch()
            opt.zero_grad()
            out = model(x)
            F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)).backward()
            opt.step()


def test_lstm_vs_gru_is_a_module_swap_not_an_init(tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    _swap_run(a, rnn="LSTM", act="none")
    _swap_run(b, rnn="GRU", act="none")
    r = graddiff.compare(a, b)
    assert r.first.step == 0 and r.first.kind == "param"
    c = r.diagnosis[0]
    assert c.cause == "module_swap", _causes(r)
    assert c.title == "a different module: rnn (LSTM / GRU) is LSTM in A and GRU in B"


def test_relu_vs_gelu_is_a_module_swap(tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    _swap_run(a, act="ReLU")
    _swap_run(b, act="GELU")
    r = graddiff.compare(a, b)
    assert (r.first.step, r.first.kind, r.first.name) == (0, "activation", "1")
    c = r.diagnosis[0]
    assert c.cause == "module_swap", _causes(r)
    assert "1 (ReLU / GELU) is ReLU in A and GELU in B" in c.title


# -- accumulation read from the loss calls when no input is recorded (graddiff record on a
# -- LightningModule whose training_step calls self.net(x): no inputs, no activations) ----------


def _accum_run(path, accumulate: int) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    with graddiff.trace(net, path, values="full", kinds="param,grad,loss"):
        for _ in range(3):
            opt.zero_grad()
            for _ in range(accumulate):
                x, y = torch.randn(8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)
                (F.cross_entropy(net(x), y) / accumulate).backward()
            opt.step()


def test_accumulation_named_from_loss_calls_without_inputs(tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    _accum_run(a, 1)
    _accum_run(b, 2)
    r = graddiff.compare(a, b)
    assert r.diverged and r.first.step == 0
    c = r.diagnosis[0]
    assert c.cause == "accumulation_steps", _causes(r)
    assert c.title.startswith("B makes 2 loss calls per optimizer step, A 1"), c.title
    assert "inputs not compared" in c.title


# -- a loss term read from intermediate outputs (vae: the KL term on mu and logvar) -----------


class _TinyVAE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(196, 16)
        self.mu = nn.Linear(16, 4)
        self.logvar = nn.Linear(16, 4)
        self.dec = nn.Linear(4, 196)

    def forward(self, x):
        h = F.relu(self.enc(x))
        mu, logvar = self.mu(h), self.logvar(h)
        z = mu + torch.randn_like(logvar) * torch.exp(0.5 * logvar)
        return torch.sigmoid(self.dec(z)), mu, logvar


def _vae_run(path, term: str) -> None:
    """BCE summed over pixels (as pytorch/examples' vae), plus a term on the encoder's outputs:
    the KL term, none, or an auxiliary penalty on mu only."""
    torch.manual_seed(0)
    net = _TinyVAE()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    data = torch.rand(3, 64, 196, generator=torch.Generator().manual_seed(1))
    with graddiff.trace(net, path, values="full"):
        for x in data:
            opt.zero_grad()
            recon, mu, logvar = net(x)
            loss = F.binary_cross_entropy(recon, x, reduction="sum")
            if term == "kl":
                loss = loss - 0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
            elif term == "mu":
                loss = loss + 0.1 * mu.pow(2).sum()
            loss.backward()
            opt.step()


@pytest.mark.parametrize("term", ["kl", "mu"])
def test_a_loss_term_on_intermediate_outputs_is_a_loss_term_not_a_path(tmp_path, term):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    _vae_run(a, term)
    _vae_run(b, "none")
    with graddiff.open(a) as ra, graddiff.open(b) as rb:
        # oracle: the forward pass of step 0 is bitwise equal, the loss is not
        for name in ("enc", "mu", "logvar", "dec"):
            assert (ra.get("activation", name, step=0) == rb.get("activation", name, step=0)).all()
        assert ra.get("loss", "loss", step=0) != rb.get("loss", "loss", step=0)
    r = graddiff.compare(a, b)
    assert r.diverged and _first(r).step == 0 and _first(r).kind == "grad_output"
    assert r.diagnosis[0].cause == "loss_function", _causes(r)
    assert "loss term" in r.diagnosis[0].title
    assert "extra_grad_path" not in _causes(r)
    # the records the term reads are named; the decoder's output gradient agrees
    text = " ".join(r.diagnosis[0].evidence)
    assert "mu (Linear)" in text and "dec" not in r.diagnosis[0].title
