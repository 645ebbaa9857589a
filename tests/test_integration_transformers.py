"""Hugging Face ``transformers.Trainer`` and Accelerate: a tiny GPT-2 built from a config,
synthetic tokens, CPU, two optimizer steps; traced by a plain ``graddiff.trace`` and by the
callback, against a hand-written loop (real transformers and accelerate)."""

from __future__ import annotations

import warnings

import pytest
import torch

import graddiff

transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")
from graddiff.integrations.transformers import GraddiffCallback  # noqa: E402

VOCAB, T, N = 64, 12, 16
LR = 1e-2


def tiny_gpt2(n_layer: int = 1) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=T,
        n_embd=16,
        n_layer=n_layer,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


class Tokens(torch.utils.data.IterableDataset):
    """Synthetic sequences in a fixed order (an iterable dataset: the Trainer does not shuffle)."""

    def __iter__(self):
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, VOCAB, (N, T), generator=g)
        for row in ids:
            yield {"input_ids": row, "labels": row.clone()}


def _batches(size: int):
    rows = list(Tokens())
    for i in range(0, N, size):
        chunk = rows[i : i + size]
        yield {k: torch.stack([r[k] for r in chunk]) for k in chunk[0]}


def train(
    model,
    out,
    *,
    path=None,
    callback=None,
    batch=8,
    accumulate=1,
    steps=2,
    evaluate=False,
    **args_kw,
):
    """``Trainer.train()`` for ``steps`` optimizer steps (AdamW, linear schedule, no warmup);
    ``evaluate``: an evaluation after every step (no grad: not recorded, changes nothing)."""
    args_kw.setdefault("learning_rate", LR)
    if evaluate:
        args_kw.update(eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=4)
    args = transformers.TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulate,
        max_steps=steps,
        lr_scheduler_type="linear",
        warmup_steps=0,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        **args_kw,
    )
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=Tokens(),
        eval_dataset=list(Tokens())[:4] if evaluate else None,
        callbacks=[callback] if callback else [],
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"(transformers|accelerate)")
        warnings.filterwarnings(
            "ignore", category=FutureWarning, module=r"(transformers|accelerate)"
        )
        if path is None:
            trainer.train()
        else:
            with graddiff.trace(model, path):
                trainer.train()
    return model


def hand_loop(model, path=None, *, steps=2, batch=8, clip=1.0, fused=True, num_items=None):
    """What the Trainer does, written by hand: AdamW, a linear schedule from LR to 0 over
    ``steps``, clipping at 1.0, ``model.zero_grad()`` after each step. ``num_items``: pass
    ``num_items_in_batch`` to the model, as the Trainer does."""
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0, fused=fused
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, (steps - s) / steps))

    def go():
        for _, inputs in zip(range(steps), _batches(batch)):
            if num_items is not None:
                inputs["num_items_in_batch"] = torch.tensor(
                    float(num_items)
                )  # float32, as the Trainer
            model(**inputs).loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            sched.step()
            model.zero_grad()

    model.train()
    if path is None:
        go()
    else:
        with graddiff.trace(model, path):
            go()
    return model


def _same_weights(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """The Trainer at batch 8 with an evaluation after each step, recorded by the callback,
    and its final weights."""
    tmp = tmp_path_factory.mktemp("hf")
    cb = GraddiffCallback(tmp / "b8.h5")
    model = train(tiny_gpt2(), tmp / "out", callback=cb, evaluate=True)
    assert cb.tracer is None  # closed at on_train_end
    return tmp / "b8.h5", [p.detach().clone() for p in model.parameters()]


def test_trainer_vs_hand_written_loop_differ_by_the_token_count(tmp_path, baseline):
    """The Trainer and the hand-written loop (same AdamW, schedule, clipping, data) differ,
    and graddiff names where: at step 0 the Trainer's model gets an extra input,
    ``num_items_in_batch``, and its loss is 11/12 of the hand loop's.

    The true reason, checked by hand below: GPT2LMHeadModel's class name matches no key of
    transformers' LOSS_MAPPING, so ``model.loss_type`` is None. The model's loss falls back to
    ForCausalLMLoss, which shifts the labels (8 x 11 = 88 predicted tokens), but the Trainer
    decides whether the loss shifts labels from ``LOSS_MAPPING.get(model.loss_type)``, finds
    nothing, and counts every label: num_items_in_batch = 8 x 12 = 96. The summed token loss
    is divided by 96 instead of 88 (transformers 5.x; a loop passing 96 by hand matches).
    """
    hf_path, _ = baseline
    hand_loop(tiny_gpt2(), tmp_path / "loop.h5")
    report = graddiff.compare(hf_path, tmp_path / "loop.h5")
    assert report.verdict == "diverged"
    f = report.first
    assert (f.step, f.kind, f.name, f.status) == (0, "input", "num_items_in_batch", "missing_in_b")
    # The numbers: what the Trainer passed, and what it did to the loss.
    hf = graddiff.open(hf_path)
    assert int(hf.get("input", "num_items_in_batch", 0)) == 8 * T != 8 * (T - 1)
    without_inputs = graddiff.compare(
        hf_path, tmp_path / "loop.h5", kinds="param,activation,loss,grad_output,grad"
    )
    g = without_inputs.first
    assert (g.step, g.kind, g.name) == (0, "activation", "(root):loss")
    ratio = hf.get("loss", "loss", 0) / graddiff.open(tmp_path / "loop.h5").get("loss", "loss", 0)
    assert ratio == pytest.approx((T - 1) / T, rel=1e-5)
    # By hand: the model's mean loss over the shifted labels, and the Trainer's count.
    model = tiny_gpt2()
    inputs = next(_batches(8))
    with torch.no_grad():
        mean = model(**inputs).loss
        summed = model(**inputs, num_items_in_batch=torch.tensor(1)).loss
    assert float(summed / mean) == pytest.approx(8 * (T - 1), rel=1e-5)
    assert model.loss_type is None
    # With the Trainer's count passed by hand, the loop reproduces the Trainer exactly.
    hand_loop(tiny_gpt2(), tmp_path / "loop96.h5", num_items=8 * T)
    same = graddiff.compare(hf_path, tmp_path / "loop96.h5")
    assert same.verdict == "identical", same.headline()


def test_plain_trace_and_callback_record_the_same_steps(tmp_path, baseline):
    hf_path, weights = baseline
    model = train(tiny_gpt2(), tmp_path / "out", path=tmp_path / "plain.h5")
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), weights))
    assert list(graddiff.open(hf_path).steps) == [0, 1]
    assert graddiff.compare(hf_path, tmp_path / "plain.h5").verdict == "identical"


def test_traced_is_bitwise_identical_to_untraced(tmp_path, baseline):
    _, weights = baseline
    model = train(tiny_gpt2(), tmp_path / "out")
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), weights))


def test_batch_8_vs_4_times_accumulation_2(tmp_path, baseline):
    """The same update in two micro-batches: no divergence beyond rounding. num_items_in_batch
    (a scalar, the same in both micro-batches) and the (1, T, C) position embedding are not
    joined along dim 0; the gradient of the broadcast embedding output is summed."""
    hf_path, _ = baseline
    train(
        tiny_gpt2(),
        tmp_path / "out",
        callback=GraddiffCallback(tmp_path / "b4x2.h5"),
        batch=4,
        accumulate=2,
    )
    run = graddiff.open(tmp_path / "b4x2.h5")
    assert list(run.steps) == [0, 1]
    assert {k.call for k in run.keys if k.name == "input_ids"} == {0, 1}
    report = graddiff.compare(hf_path, tmp_path / "b4x2.h5")
    assert report.exit_code == 0, report.headline()
    notes = "\n".join(report.structure["pairing"])
    assert "input num_items_in_batch" in notes and "does not carry the batch" in notes


def test_injected_bug_learning_rate(tmp_path, baseline):
    """A different learning rate: the parameters differ after the first update (step 1)."""
    hf_path, _ = baseline
    train(
        tiny_gpt2(),
        tmp_path / "out",
        callback=GraddiffCallback(tmp_path / "lr.h5"),
        learning_rate=2 * LR,
    )
    report = graddiff.compare(hf_path, tmp_path / "lr.h5")
    assert (report.first.step, report.first.kind) == (1, "param")
    assert report.cause.cause == "learning_rate", report.headline()


# -- bad input: one message, training goes on untraced -------------------------------------


def test_second_trace_of_the_same_model_warns_and_training_continues(tmp_path):
    model = tiny_gpt2()
    cb = GraddiffCallback(tmp_path / "inner.h5")
    with pytest.warns(RuntimeWarning, match="transformers training is not traced: .*already being"):
        with graddiff.trace(model, tmp_path / "outer.h5"):
            train(model, tmp_path / "out", callback=cb, steps=1)
    assert not (tmp_path / "inner.h5").exists()
    assert list(graddiff.open(tmp_path / "outer.h5").steps) == [0]


def test_callback_without_a_module_or_on_an_old_version_warns(tmp_path, monkeypatch):
    state, control = transformers.TrainerState(), transformers.TrainerControl()
    cb = GraddiffCallback(tmp_path / "x.h5")
    with pytest.warns(RuntimeWarning, match="not traced: the model is a NoneType"):
        cb.on_train_begin(None, state, control, model=None)
    cb.on_step_begin(None, state, control)
    cb.on_step_end(None, state, control)
    cb.on_train_end(None, state, control)
    monkeypatch.setattr(transformers, "__version__", "4.2.1")
    with pytest.warns(RuntimeWarning, match=r"transformers 4\.2\.1 is older than 4\.30"):
        old = GraddiffCallback(tmp_path / "y.h5")
    old.on_train_begin(None, state, control, model=tiny_gpt2())
    assert old.tracer is None and not (tmp_path / "y.h5").exists()


def test_bad_options_fail_at_construction(tmp_path):
    with pytest.raises(graddiff.TraceUsageError, match="kinds"):
        GraddiffCallback(tmp_path / "x.h5", kinds="weights")


# -- Accelerate: no callback; trace the model, unwrapped or not --------------------------------


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))


def _xy(batch):
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(16, 6, generator=g), torch.randn(16, 2, generator=g)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, 16, batch)]


def accelerate_loop(path, *, batch=8, accumulate=1, unwrap=True):
    """The Accelerate idiom: prepare, ``accelerator.accumulate``, ``accelerator.backward``."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    acc = Accelerator(cpu=True, gradient_accumulation_steps=accumulate)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = acc.prepare(model, opt)
    target = acc.unwrap_model(model) if unwrap else model

    def go():
        for x, y in _xy(batch):
            with acc.accumulate(model):
                acc.backward(torch.nn.functional.mse_loss(model(x), y))
                opt.step()
                opt.zero_grad()

    if path is None:
        go()
    else:
        with graddiff.trace(target, path):
            go()
    return acc.unwrap_model(model)


def plain_mlp_loop(path):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with graddiff.trace(model, path):
        for x, y in _xy(8):
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    return model


@pytest.mark.parametrize("unwrap", [True, False], ids=["unwrap_model", "prepared_model"])
def test_accelerate_matches_the_plain_loop(tmp_path, unwrap):
    a = accelerate_loop(tmp_path / "acc.h5", unwrap=unwrap)
    b = plain_mlp_loop(tmp_path / "plain.h5")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert graddiff.compare(tmp_path / "acc.h5", tmp_path / "plain.h5").verdict == "identical"


def test_accelerate_accumulation_is_one_step_per_update(tmp_path):
    accelerate_loop(tmp_path / "acc.h5", batch=4, accumulate=2)
    plain_mlp_loop(tmp_path / "plain.h5")
    assert list(graddiff.open(tmp_path / "acc.h5").steps) == [0, 1]
    report = graddiff.compare(tmp_path / "acc.h5", tmp_path / "plain.h5")
    assert report.exit_code == 0, report.headline()


def test_accelerate_traced_is_bitwise_identical_to_untraced(tmp_path):
    traced = accelerate_loop(tmp_path / "acc.h5", batch=4, accumulate=2)
    untraced = accelerate_loop(None, batch=4, accumulate=2)
    assert all(torch.equal(p, q) for p, q in zip(traced.parameters(), untraced.parameters()))


def test_accelerate_injected_bug_missing_zero_grad(tmp_path):
    """Accumulating across updates (zero_grad forgotten): the gradient differs at step 1."""
    from accelerate import Accelerator

    plain_mlp_loop(tmp_path / "plain.h5")
    acc = Accelerator(cpu=True)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = acc.prepare(model, opt)
    with graddiff.trace(acc.unwrap_model(model), tmp_path / "bug.h5"):
        for x, y in _xy(8):
            acc.backward(torch.nn.functional.mse_loss(model(x), y))
            opt.step()
    report = graddiff.compare(tmp_path / "plain.h5", tmp_path / "bug.h5")
    assert (report.first.step, report.first.kind) == (1, "grad")
    assert report.cause.cause == "grad_accumulation", report.headline()
