"""The recorded optimizer settings as evidence on real framework runs: two Hugging Face
``Trainer`` runs that differ only in ``warmup_steps`` or ``lr_scheduler_type``, and a Lightning
module whose ``configure_optimizers`` differs (its scheduler config, its weight decay groups).
Tiny models, a few steps, CPU. The oracle: the change the test made, the first update it acts
on, and the cause and numbers to expect."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graddiff

transformers = pytest.importorskip("transformers")
L = pytest.importorskip("lightning.pytorch")

VOCAB, T, N = 64, 12, 32


def _gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=T,
        n_embd=16,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


class _Tokens(torch.utils.data.IterableDataset):
    def __iter__(self):
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, VOCAB, (N, T), generator=g)
        for row in ids:
            yield {"input_ids": row, "labels": row.clone()}


def _trainer_run(path, tmp, **kw) -> str:
    """``Trainer.train()`` for 4 optimizer steps (AdamW, the Trainer's own scheduler)."""
    model = _gpt2()
    args = dict(
        output_dir=str(tmp),
        per_device_train_batch_size=8,
        max_steps=4,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    args.update(kw)
    trainer = transformers.Trainer(
        model=model, args=transformers.TrainingArguments(**args), train_dataset=_Tokens()
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"(transformers|accelerate)")
        warnings.filterwarnings(
            "ignore", category=FutureWarning, module=r"(transformers|accelerate)"
        )
        with graddiff.trace(model, path):
            trainer.train()
    return str(path)


def test_trainer_warmup_steps(tmp_path):
    """warmup_steps 0 vs 2: the Trainer's LambdaLR starts B at rate 0, so update 0 leaves B's
    weights where they were; the rates are 0.01 vs 0 there (recorded)."""
    a = _trainer_run(tmp_path / "a.h5", tmp_path / "oa", warmup_steps=0)
    b = _trainer_run(tmp_path / "b.h5", tmp_path / "ob", warmup_steps=2)
    with graddiff.open(a) as ra, graddiff.open(b) as rb:
        la = ra.optimizer_settings.series("lr", [0, 1, 2, 3])
        lb = rb.optimizer_settings.series("lr", [0, 1, 2, 3])
        assert ra.optimizer_settings.at(0)[0].short_class.startswith("AdamW")
    assert la[0] == pytest.approx(1e-2) and lb[:2] == [0.0, pytest.approx(5e-3)]
    r = graddiff.compare(a, b)
    assert r.exit_code == 1 and (r.first.step, r.first.kind) == (1, "param"), r.headline()
    assert r.cause.cause == "learning_rate", [(c.cause, c.title) for c in r.diagnosis]
    assert "learning rate differs: 0.01 in A vs 0 in B at step 0" in r.cause.title, r.cause


def test_trainer_scheduler_type(tmp_path):
    """linear vs constant schedule: they part at the second update (the first rate is the
    peak in both), and the recorded rates say by how much."""
    a = _trainer_run(tmp_path / "a.h5", tmp_path / "oa", lr_scheduler_type="linear")
    b = _trainer_run(tmp_path / "b.h5", tmp_path / "ob", lr_scheduler_type="constant")
    r = graddiff.compare(a, b)
    assert r.exit_code == 1 and (r.first.step, r.first.kind) == (2, "param"), r.headline()
    assert r.cause.cause == "learning_rate", [(c.cause, c.title) for c in r.diagnosis]
    assert "learning rate differs: 0.0075 in A vs 0.01 in B at step 1" in r.cause.title, r.cause
    assert "recorded learning rate of" in " ".join(r.cause.evidence)


class _Module(L.LightningModule):
    def __init__(self, sched: str = "none", decay_bias: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
        self.sched, self.decay_bias = sched, decay_bias

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self):
        named = list(self.named_parameters())
        if self.decay_bias:
            groups = [{"params": [p for _, p in named], "weight_decay": 0.1}]
        else:
            groups = [
                {"params": [p for n, p in named if n.endswith("weight")], "weight_decay": 0.1},
                {"params": [p for n, p in named if n.endswith("bias")], "weight_decay": 0.0},
            ]
        opt = torch.optim.AdamW(groups, lr=1e-2)
        if self.sched == "none":
            return opt
        sch = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        interval = "epoch" if self.sched == "epoch" else "step"
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sch, "interval": interval}}


def _fit(module, path) -> str:
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(
        torch.randn(24, 6, generator=g), torch.randn(24, 2, generator=g)
    )
    trainer = L.Trainer(
        max_epochs=3,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"lightning\..*")
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*LeafSpec.*")
        with graddiff.trace(module, path):
            trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    return str(path)


def test_lightning_scheduler_interval_epoch_vs_step(tmp_path):
    """configure_optimizers returns the same StepLR with interval "epoch" (3 steps per epoch)
    vs "step": the recorded rates relate by a stride of 3."""
    a = _fit(_Module("epoch"), tmp_path / "a.h5")
    b = _fit(_Module("step"), tmp_path / "b.h5")
    r = graddiff.compare(a, b)
    assert r.exit_code == 1 and (r.first.step, r.first.kind) == (2, "param"), r.headline()
    assert r.cause.cause == "learning_rate", [(c.cause, c.title) for c in r.diagnosis]
    assert "stepped once every 3 steps in A and at every step in B" in r.cause.title, r.cause


def test_lightning_decay_groups(tmp_path):
    a = _fit(_Module(), tmp_path / "a.h5")
    b = _fit(_Module(decay_bias=False), tmp_path / "b.h5")
    r = graddiff.compare(a, b)
    assert r.exit_code == 1 and (r.first.step, r.first.kind) == (1, "param"), r.headline()
    assert r.cause.cause == "weight_decay", [(c.cause, c.title) for c in r.diagnosis]
    assert "net.0.bias, net.2.bias (both Linear) excluded from decay in B" in r.cause.title
