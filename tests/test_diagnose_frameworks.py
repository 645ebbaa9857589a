"""Causes audited on pairs of real runs, plain loops and real frameworks (Lightning, the HF
Trainer): data order, dropout probability, gradient accumulation settings, and an equivalent
pair (Lightning ``deterministic=True``). Each test is its own oracle: it knows what it changed,
where it first acts, and what the differ must say."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from classcheck import diagnosis_unlabelled
from torch import nn

import graddiff

X = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
Y = torch.randint(0, 4, (64,), generator=torch.Generator().manual_seed(2))


def _loop(path, *, shuffle_seed=4, noise=False, p=0.2, steps=4, freeze=False) -> str:
    """An MLP with dropout on a shuffled DataLoader; ``noise``: augmentation by random noise;
    ``freeze``: the first layer frozen (requires_grad=False, left out of the optimizer)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(p), nn.Linear(16, 4))
    net[0].requires_grad_(not freeze)
    o = torch.optim.SGD([q for q in net.parameters() if q.requires_grad], lr=0.1)
    data = torch.utils.data.TensorDataset(X, Y)
    g = torch.Generator().manual_seed(shuffle_seed)
    dl = torch.utils.data.DataLoader(data, batch_size=16, shuffle=True, generator=g)
    torch.manual_seed(0)
    with graddiff.trace(net, path, values="full"):
        for i, (x, y) in enumerate(dl):
            if i == steps:
                break
            if noise:
                x = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(i))
            o.zero_grad()
            F.cross_entropy(net(x), y).backward()
            o.step()
    return str(path)


def test_data_order_is_told_from_other_samples(tmp_path):
    """Another shuffle seed: A's first batch is drawn by B at later steps."""
    r = graddiff.compare(_loop(tmp_path / "a.h5"), _loop(tmp_path / "b.h5", shuffle_seed=5))
    assert (r.first.step, r.first.kind) == (0, "input"), r.headline()
    assert r.cause.cause == "different_inputs"
    assert r.cause.title == "different data order: the same samples at other steps"
    text = " ".join(r.cause.evidence)
    assert "of the 16 samples of A's batch at step 0 occur in B at other steps" in text
    # augmentation noise: no sample of one run occurs anywhere in the other
    r = graddiff.compare(_loop(tmp_path / "a.h5"), _loop(tmp_path / "c.h5", noise=True))
    assert r.cause.cause == "different_inputs"
    assert r.cause.title == "different inputs: not the same samples (augmentation or data)"
    assert "at any of the 3 recorded steps searched" in " ".join(r.cause.evidence)


def test_frozen_vs_trainable(tmp_path):
    r = graddiff.compare(_loop(tmp_path / "a.h5", freeze=True), _loop(tmp_path / "b.h5"))
    assert r.first.step == 0 and r.cause.cause == "frozen_parameter", r.headline()
    assert r.cause.title == (
        "frozen vs trainable: 0.weight, 0.bias (both Linear) frozen in A (no gradient, never "
        "updated), trained in B"
    )
    assert "stay bitwise unchanged in A from step 0 to 3" in " ".join(r.cause.evidence)
    # one step only: nothing shows the parameters stay unchanged, the title stays a question
    r = graddiff.compare(tmp_path / "a.h5", tmp_path / "b.h5", steps="0")
    assert r.cause.title == "2 parameter(s) have a gradient in B only: a frozen layer?"


@pytest.mark.parametrize(
    ("p_b", "zero"), [(0.4, False), (0.0, True)], ids=["0.2 vs 0.4", "0.2 vs 0"]
)
def test_dropout_probability(tmp_path, p_b, zero):
    r = graddiff.compare(_loop(tmp_path / "a.h5"), _loop(tmp_path / "b.h5", p=p_b))
    assert (r.first.step, r.first.kind, r.first.name) == (0, "activation", "2"), r.headline()
    assert [c.cause for c in r.diagnosis] == ["dropout_rate"], [
        (c.cause, c.title) for c in r.diagnosis
    ]
    assert "dropout probability differs in 2 (Dropout)" in r.cause.title
    text = " ".join(r.cause.evidence)
    c = (1 - 0.2) / (1 - p_b)  # B's kept elements are A's x (1 - p_A) / (1 - p_B)
    assert f"B's output is A's x {c:.3g} exactly" in text
    if zero:
        assert "p = 0 in B, p = 0.2 in A" in text
    assert not diagnosis_unlabelled(r)


L = pytest.importorskip("lightning.pytorch")


class _Reg(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _fit(path, **trainer_kw) -> str:
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(
        torch.randn(32, 6, generator=g), torch.randn(32, 2, generator=g)
    )
    m = _Reg()
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kw,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"lightning\..*")
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*LeafSpec.*")
        with graddiff.trace(m, path):
            trainer.fit(m, torch.utils.data.DataLoader(data, batch_size=8))
    return str(path)


def test_lightning_accumulate_grad_batches(tmp_path):
    """accumulate_grad_batches=2 (Lightning divides each loss by 2): two batches per step, so
    the first step's loss is no loss weight of the other run's."""
    a, b = _fit(tmp_path / "a.h5"), _fit(tmp_path / "b.h5", accumulate_grad_batches=2)
    r = graddiff.compare(a, b)
    assert r.exit_code == 1 and r.first.step == 0, r.headline()
    causes = [c.cause for c in r.diagnosis]
    assert causes[0] == "accumulation_steps" and "loss_scale" not in causes, causes
    assert r.cause.title.startswith(
        "B accumulates 2 micro-batches per optimizer step (16 samples), A 1 (8 samples)"
    )
    text = " ".join(r.cause.evidence)
    assert "1 call of 8 samples in A and 2 calls of 8 samples in B" in text
    assert "A records 4 optimizer steps, B 2" in text
    assert "step_mismatch" in causes


def test_lightning_deterministic_is_the_same_training(tmp_path):
    """deterministic=True changes nothing on CPU: an equivalent pair, never DIVERGED."""
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    env = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    try:
        b = _fit(tmp_path / "b.h5", deterministic=True)
    finally:  # Lightning leaves deterministic algorithms (and their settings) on: undo it
        torch.use_deterministic_algorithms(before, warn_only=warn_only)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
        if env is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = env
    r = graddiff.compare(_fit(tmp_path / "a.h5"), b)
    assert r.exit_code == 0 and r.first is None, r.headline()


transformers = pytest.importorskip("transformers")


def _hf(path, out, *, pdrop=0.0, accumulate=1, seed=42) -> str:
    """Three HF Trainer steps of a tiny GPT-2 (a map-style dataset: the Trainer shuffles it)."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=64,
        n_positions=12,
        n_embd=16,
        n_layer=1,
        n_head=2,
        resid_pdrop=pdrop,
        embd_pdrop=pdrop,
        attn_pdrop=pdrop,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 64, (32, 12), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": r, "labels": r.clone()} for r in ids]
    args = transformers.TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=accumulate,
        max_steps=2,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=seed,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with graddiff.trace(model, path):
            trainer.train()
    return str(path)


def test_hf_trainer_dropout_config(tmp_path):
    """resid/embd/attn_pdrop 0.1 vs 0: the first dropout (the embeddings') is named, with p."""
    a = _hf(tmp_path / "a.h5", tmp_path, pdrop=0.1)
    b = _hf(tmp_path / "b.h5", tmp_path)
    r = graddiff.compare(a, b)
    assert (r.first.step, r.first.kind, r.first.name) == (0, "activation", "transformer.drop")
    assert r.cause.cause == "dropout_rate", [(c.cause, c.title) for c in r.diagnosis]
    assert "p = 0 in B, p = 0.1 in A" in " ".join(r.cause.evidence)


def test_hf_trainer_gradient_accumulation_steps(tmp_path):
    a = _hf(tmp_path / "a.h5", tmp_path)
    b = _hf(tmp_path / "b.h5", tmp_path, accumulate=2)
    r = graddiff.compare(a, b)
    assert r.exit_code == 1 and r.first.step == 0, r.headline()
    assert r.cause.cause == "accumulation_steps", [(c.cause, c.title) for c in r.diagnosis]
    assert "B accumulates 2 micro-batches per optimizer step (8 samples), A 1 (4 samples)" in (
        r.cause.title
    )


def test_hf_trainer_seed_changes_the_data_order(tmp_path):
    """TrainingArguments(seed=...) seeds the Trainer's shuffling: the same samples, other steps."""
    a = _hf(tmp_path / "a.h5", tmp_path)
    b = _hf(tmp_path / "b.h5", tmp_path, seed=1)
    r = graddiff.compare(a, b)
    assert (r.first.step, r.first.kind) == (0, "input"), r.headline()
    assert r.cause.title == "different data order: the same samples at other steps"
