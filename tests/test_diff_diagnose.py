"""Each diagnosis rule on synthetic runs: the cause, and the evidence that names it."""

from __future__ import annotations

import pytest
from diff_builders import simulate

import graddiff

# (id, variant of A, variant of B, step, kind, cause id, text in title or evidence)
CASES = [
    ("init", {}, {"init_seed": 1}, 0, "param", "different_init", "initial weights"),
    ("inputs", {}, {"data_seed": 4}, 0, "input", "different_inputs", "samples"),
    (
        "accumulation",
        {},
        {"zero_grad": False},
        1,
        "grad",
        "grad_accumulation",
        "sum of A's gradients",
    ),
    (
        "accumulation stats",
        {"store_values": False},
        {"store_values": False, "zero_grad": False},
        1,
        "grad",
        "grad_accumulation",
        "statistics only",
    ),
    (
        "accumulation vs autograd",
        {"zero_grad": False},
        {"autograd": True},
        1,
        "grad",
        "grad_accumulation",
        "in A",
    ),
    (
        "learning rate",
        {},
        {"lr_gamma": (2, 0.5)},
        3,
        "param",
        "learning_rate",
        "0.1 in A vs 0.05 in B",
    ),
    ("weight decay", {}, {"weight_decay": 0.1}, 1, "param", "weight_decay", "0 in A vs 0.1 in B"),
    (
        "momentum",
        {},
        {"momentum": 0.9},
        2,
        "param",
        "optimizer_state",
        "momentum differs: 0 in A vs 0.9 in B",
    ),
    ("clipping", {}, {"clip": 0.05}, 0, "grad", "grad_clipping", "max_norm 0.05, A does not"),
    ("batchnorm momentum", {}, {"bn_momentum": 0.3}, 0, "buffer", "batchnorm_stats", "momentum"),
    (
        "extra train forward",
        {},
        {"micro": 2},
        0,
        "buffer",
        "batchnorm_stats",
        "num_batches_tracked",
    ),
    (
        "dropout",
        {"dropout": 0.5},
        {"dropout": 0.5, "dropout_seed": 7},
        0,
        "activation",
        "dropout_rng",
        "zeroed",
    ),
    (
        "eval mode",
        {"dropout": 0.5},
        {"dropout": 0.5, "train_mode": False},
        0,
        "activation",
        "train_eval_mode",
        "model.train()",
    ),
    (
        "other op",
        {},
        {"act": "tanh"},
        0,
        "activation",
        "module_output",
        "earlier recorded output agrees",
    ),
    ("frozen", {}, {"frozen": True}, 0, "grad", "frozen_parameter", "fc1.weight"),
    ("nan", {}, {"nan_at": 1}, 1, "activation", "nonfinite", "NaN"),
    (
        "unscaled micro-batch loss",
        {},
        {"micro": 2, "scale_micro": False},
        0,
        "loss",
        "unscaled_micro_batches",
        "not divided by 2",
    ),
]


@pytest.mark.parametrize(
    ("va", "vb", "step", "kind", "cause", "text"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_rule(tmp_path, va, vb, step, kind, cause, text):
    r = graddiff.compare(simulate(tmp_path / "a.h5", **va), simulate(tmp_path / "b.h5", **vb))
    assert (r.first.step, r.first.kind, r.exit_code) == (step, kind, 1)
    assert r.cause.cause == cause
    assert text in r.cause.title + " ".join(r.cause.evidence)


def test_rounding_cites_the_environment(tmp_path):
    a = simulate(tmp_path / "a.h5", environment={"num_threads": 1, "argv": ["a.py"]})
    b = simulate(tmp_path / "b.h5", ulp_at=1, environment={"num_threads": 2, "argv": ["b.py"]})
    r = graddiff.compare(a, b)
    assert r.verdict == "within_tolerance" and r.cause.cause == "rounding"
    assert any("num_threads 1 vs 2" in e for e in r.cause.evidence)
    assert any("update rounds differently" in e for e in r.cause.evidence)
    rows = {row["key"]: row for row in r.environment_diff}
    assert rows["num_threads"]["relevant"] and not rows["argv"]["relevant"]


def test_same_samples_in_another_order(tmp_path):
    import numpy as np
    from diff_builders import write_run

    from graddiff.entries import entry_from_array

    w = np.ones((3, 4), np.float32)
    x = np.arange(512, dtype=np.float32).reshape(64, 8)  # several fingerprint blocks
    a = write_run(
        tmp_path / "a.h5", [[entry_from_array("param", "w", w), entry_from_array("input", "0", x)]]
    )
    b = write_run(
        tmp_path / "b.h5",
        [[entry_from_array("param", "w", w), entry_from_array("input", "0", x[::-1])]],
    )
    r = graddiff.compare(a, b)
    assert (
        r.cause.cause == "different_inputs" and "same samples in a different order" in r.cause.title
    )


def test_dtype_change_is_structure_and_compared_by_value(tmp_path):
    import numpy as np
    from diff_builders import write_run

    from graddiff.entries import entry_from_array

    w = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    a = write_run(tmp_path / "a.h5", [[entry_from_array("param", "w", w)]])
    b = write_run(tmp_path / "b.h5", [[entry_from_array("param", "w", w.astype(np.float64))]])
    r = graddiff.compare(a, b)
    assert r.verdict == "within_tolerance"  # same values, different bits
    assert r.structure["dtype_changes"] == [
        {"label": "param w", "step": 0, "a": "float32", "b": "float64"}
    ]
    assert graddiff.compare(a, b, exact=True).exit_code == 1
