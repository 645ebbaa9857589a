"""PyTorch Lightning: ``Trainer.fit`` under a plain ``graddiff.trace`` and under the callback,
against the same model trained by a hand-written loop (real Lightning, CPU, a few steps)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graddiff

L = pytest.importorskip("lightning.pytorch")
from graddiff.integrations.lightning import GraddiffCallback  # noqa: E402

N, BATCH = 48, 8  # 6 batches per epoch


class Regressor(L.LightningModule):
    """A tiny MLP; ``via`` picks how training_step calls it (self(x), or the submodule)."""

    def __init__(self, lr=0.1, optimizer="sgd", via="forward", manual=False, freeze=False):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
        if freeze:
            self.net[0].weight.requires_grad_(False)
        self.lr, self.optimizer, self.via = lr, optimizer, via
        self.automatic_optimization = not manual

    def forward(self, x):
        return self.net(x)

    def loss(self, batch):
        x, y = batch
        return F.mse_loss(self(x) if self.via == "forward" else self.net(x), y)

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        if self.automatic_optimization:
            return loss
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return None

    def validation_step(self, batch, batch_idx):
        self.log("val", self.loss(batch))

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer == "lbfgs":
            return torch.optim.LBFGS(params, lr=self.lr, max_iter=3)
        return torch.optim.SGD(params, lr=self.lr, momentum=0.9)


def _dataset():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(N, 6, generator=g), torch.randn(N, 2, generator=g)
    return torch.utils.data.TensorDataset(x, y)


def _loader():
    return torch.utils.data.DataLoader(_dataset(), batch_size=BATCH)


def fit(model, *, path=None, callback=None, ckpt_path=None, max_epochs=1, **trainer_kw):
    """One epoch of ``Trainer.fit`` with validation every 3 batches; traced by a plain
    ``graddiff.trace`` around fit when ``path`` is given."""
    trainer_kw.setdefault("val_check_interval", 3)
    trainer = L.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=2,
        num_sanity_val_steps=1,
        callbacks=[callback] if callback else [],
        **trainer_kw,
    )
    with warnings.catch_warnings():
        # Lightning's advice on num_workers, logging and tips: not what these tests are about.
        warnings.filterwarnings("ignore", category=UserWarning, module=r"lightning\..*")
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*LeafSpec.*")
        if path is None:
            trainer.fit(model, _loader(), _loader(), ckpt_path=ckpt_path)
        else:
            with graddiff.trace(model, path):
                trainer.fit(model, _loader(), _loader(), ckpt_path=ckpt_path)
    return model


def plain_loop(model, path=None, *, accumulate=1, clip=None, amp=None):
    """The same training written by hand (what Lightning does, minus Lightning).

    ``amp``: None, "bf16" (autocast) or "fp16" (autocast and a GradScaler).
    """
    opt = model.configure_optimizers()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if amp == "fp16" else None
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16

    def go():
        for i, batch in enumerate(_loader()):
            if isinstance(opt, torch.optim.LBFGS):

                def closure(batch=batch):
                    opt.zero_grad()
                    loss = model.loss(batch)
                    loss.backward()
                    return loss

                opt.step(closure)
                continue
            with torch.autocast("cpu", dtype=dtype, enabled=amp is not None):
                loss = model.loss(batch) / accumulate
            (scaler.scale(loss) if scaler else loss).backward()
            if (i + 1) % accumulate:
                continue
            if scaler:
                scaler.unscale_(opt)
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            opt.zero_grad()

    if path is None:
        go()
    else:
        with graddiff.trace(model, path):
            go()
    return model


def _same_weights(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


CASES = {
    "plain": ({}, {}),
    "accumulate2": ({"accumulate_grad_batches": 2}, {"accumulate": 2}),
    "clip": ({"gradient_clip_val": 0.05}, {"clip": 0.05}),
    "lbfgs": ({"model": {"optimizer": "lbfgs"}}, {}),
    "manual": ({"model": {"manual": True}}, {}),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_fit_under_plain_trace_matches_the_hand_written_loop(tmp_path, case):
    pl_kw, loop_kw = CASES[case]
    model_kw = pl_kw.pop("model", {}) if "model" in pl_kw else {}
    a = fit(Regressor(**model_kw), path=tmp_path / "fit.h5", **pl_kw)
    b = plain_loop(Regressor(**model_kw), tmp_path / "loop.h5", **loop_kw)
    assert _same_weights(a, b)
    report = graddiff.compare(tmp_path / "fit.h5", tmp_path / "loop.h5")
    assert report.verdict == "identical", report.headline()
    run = graddiff.open(tmp_path / "fit.h5")
    n_steps = 6 // loop_kw.get("accumulate", 1)
    assert list(run.steps) == list(range(n_steps))
    for step in run.steps:  # every step has this step's gradients and inputs
        assert run.stats("grad", "net.0.weight", int(step))["numel"] == 48
        assert run.stats("input", "0", int(step))["numel"] == BATCH * 6
    assert run.names("input") == ["0"]  # the model called as a whole: its own arguments only


def test_callback_names_steps_by_global_step_and_matches_the_plain_loop(tmp_path):
    cb = GraddiffCallback(tmp_path / "cb.h5")
    a = fit(Regressor(), callback=cb, accumulate_grad_batches=2)
    b = plain_loop(Regressor(), tmp_path / "loop.h5", accumulate=2)
    assert _same_weights(a, b) and cb.tracer is None
    run = graddiff.open(tmp_path / "cb.h5")
    assert list(run.steps) == [0, 1, 2] and run.status == "complete"
    assert graddiff.compare(tmp_path / "cb.h5", tmp_path / "loop.h5").verdict == "identical"


def test_resumed_fit_steps_continue_from_the_checkpoints_global_step(tmp_path):
    first = fit(Regressor())
    first.trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    cb = GraddiffCallback(tmp_path / "resumed.h5")
    fit(Regressor(), callback=cb, ckpt_path=tmp_path / "epoch1.ckpt", max_epochs=2)
    assert list(graddiff.open(tmp_path / "resumed.h5").steps) == list(range(6, 12))


class _OtherOptimizerState(Regressor):
    """Resumes the checkpoint's weights with another checkpoint's optimizer state (Lightning
    restores the optimizers from the dict on_load_checkpoint sees, after this hook)."""

    def __init__(self, optimizer_states):
        super().__init__()
        self.optimizer_states = optimizer_states

    def on_load_checkpoint(self, checkpoint):
        checkpoint["optimizer_states"] = self.optimizer_states


def test_resumed_from_checkpoint_a_vs_checkpoint_b_names_the_optimizer_state(tmp_path):
    """ckpt_path resumes: the same weights, the optimizer state (SGD momentum) of checkpoint A
    or B (one epoch at lr 0.1 or 0.05): the states' fingerprints at the first update differ."""
    a, b = fit(Regressor()), fit(Regressor(lr=0.05))
    a.trainer.save_checkpoint(tmp_path / "a.ckpt")
    states = {
        "a": [a.trainer.optimizers[0].state_dict()],
        "b": [b.trainer.optimizers[0].state_dict()],
    }
    for name in ("a", "a2", "b"):
        fit(
            _OtherOptimizerState(copy.deepcopy(states[name[0]])),  # loads share tensors
            callback=GraddiffCallback(tmp_path / f"{name}.h5"),
            ckpt_path=tmp_path / "a.ckpt",
            max_epochs=2,
        )
    r = graddiff.compare(tmp_path / "a.h5", tmp_path / "b.h5")
    assert (r.first.step, r.first.kind) == (7, "param"), r.headline()
    assert r.cause.cause == "optimizer_state", r.cause
    assert "state held at the optimizers' first update at step 6 is not the same" in r.cause.title
    assert graddiff.compare(tmp_path / "a.h5", tmp_path / "a2.h5").verdict == "identical"


def test_callback_records_the_batch_when_training_step_bypasses_forward(tmp_path):
    fit(Regressor(via="submodule"), callback=GraddiffCallback(tmp_path / "cb.h5"))
    run = graddiff.open(tmp_path / "cb.h5")
    # the batch (inputs and targets) and the arguments of the outermost module called
    assert {n for n in run.names("input")} == {"batch:0", "batch:1", "net:0"}
    assert run.stats("input", "batch:0", 5)["numel"] == BATCH * 6
    assert (
        run.stats("input", "net:0", 5)["fingerprint"]
        == run.stats("input", "batch:0", 5)["fingerprint"]
    )


def test_plain_trace_records_the_submodules_inputs_when_training_step_bypasses_forward(tmp_path):
    """training_step calls self.net(x): the LightningModule's forward never runs; the inputs
    are self.net's arguments in every step, the same records as the hand-written loop's."""
    a = fit(Regressor(via="submodule"), path=tmp_path / "fit.h5")
    b = plain_loop(Regressor(via="submodule"), tmp_path / "loop.h5")
    assert _same_weights(a, b)
    run = graddiff.open(tmp_path / "fit.h5")
    assert run.names("input") == ["net:0"] and list(run.steps) == list(range(6))
    assert all(run.stats("input", "net:0", int(s))["numel"] == BATCH * 6 for s in run.steps)
    assert graddiff.compare(tmp_path / "fit.h5", tmp_path / "loop.h5").verdict == "identical"


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_inside_the_trainer(tmp_path, amp):
    """bf16: autocast inside the closure passed to optimizer.step(closure). fp16 with a
    GradScaler: Lightning runs the closure itself, unscales, then scaler.step(optimizer)."""
    if amp == "bf16":
        kw = {"precision": "bf16-mixed"}
    else:
        from lightning.pytorch.plugins import MixedPrecision

        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        kw = {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=scaler)]}
    a = fit(Regressor(), path=tmp_path / "fit.h5", **kw)
    b = plain_loop(Regressor(), tmp_path / "loop.h5", amp=amp)
    assert _same_weights(a, b)
    report = graddiff.compare(tmp_path / "fit.h5", tmp_path / "loop.h5")
    assert report.verdict == "identical", report.headline()


@pytest.mark.parametrize("how", ["plain", "callback"])
def test_traced_fit_is_bitwise_identical_to_untraced(tmp_path, how):
    untraced = fit(Regressor(), accumulate_grad_batches=2)
    if how == "plain":
        traced = fit(Regressor(), path=tmp_path / "t.h5", accumulate_grad_batches=2)
    else:
        cb = GraddiffCallback(tmp_path / "t.h5")
        traced = fit(Regressor(), callback=cb, accumulate_grad_batches=2)
    assert _same_weights(untraced, traced)


@pytest.mark.parametrize(
    "bug, where",
    [
        ({"lr": 0.2}, ("param", 1)),  # a different learning rate: the first update differs
        ({"freeze": True}, ("grad", 0)),  # a frozen layer: no gradient from step 0
    ],
    ids=["learning_rate", "frozen_layer"],
)
def test_injected_bug_is_named(tmp_path, bug, where):
    fit(Regressor(), callback=GraddiffCallback(tmp_path / "good.h5"))
    fit(Regressor(**bug), callback=GraddiffCallback(tmp_path / "bad.h5"))
    report = graddiff.compare(tmp_path / "good.h5", tmp_path / "bad.h5")
    assert report.verdict == "diverged"
    assert (report.first.kind, report.first.step) == where
    expected = {"lr": "learning_rate", "freeze": "frozen_parameter"}[next(iter(bug))]
    assert report.cause.cause == expected, report.headline()


# -- bad input: one message, training goes on untraced -------------------------------------


def test_second_trace_of_the_same_model_warns_and_training_continues(tmp_path):
    model = Regressor()
    cb = GraddiffCallback(tmp_path / "inner.h5")
    with pytest.warns(RuntimeWarning, match="Lightning training is not traced: .*already being"):
        with graddiff.trace(model, tmp_path / "outer.h5"):
            fit(model, callback=cb)
    assert not (tmp_path / "inner.h5").exists()
    assert list(graddiff.open(tmp_path / "outer.h5").steps) == list(range(6))
    assert _same_weights(model, fit(Regressor()))


def test_unwritable_path_warns_and_training_continues(tmp_path):
    (tmp_path / "file").write_text("")
    cb = GraddiffCallback(tmp_path / "file" / "x.h5")
    with pytest.warns(RuntimeWarning, match="not traced: .*cannot create the trace file"):
        model = fit(Regressor(), callback=cb)
    assert _same_weights(model, fit(Regressor()))


def test_bad_options_fail_at_construction_not_in_the_trainer(tmp_path):
    with pytest.raises(graddiff.TraceUsageError, match="values="):
        GraddiffCallback(tmp_path / "x.h5", values="everything")


def test_exception_in_training_step_closes_the_trace(tmp_path):
    class Broken(Regressor):
        def training_step(self, batch, batch_idx):
            if batch_idx == 2:
                raise ValueError("broken batch")
            return super().training_step(batch, batch_idx)

    with pytest.raises(ValueError, match="broken batch"):
        fit(Broken(), callback=GraddiffCallback(tmp_path / "x.h5"))
    run = graddiff.open(tmp_path / "x.h5")
    assert list(run.steps) == [0, 1] and "ValueError" in run.status
    import torch.optim.optimizer as optim_module

    assert not optim_module._global_optimizer_pre_hooks
