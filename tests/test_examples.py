"""The examples/ scripts run, and graddiff's verdict on each motivating question is the right one.

Each script is imported and its ``main(argv)`` called with a tiny model and few steps; the test
then compares the two trace files itself and checks step, kind, record and diagnosis.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import graddiff

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SMALL = ["--steps", "3", "--width", "32", "--batch", "32", "--train-size", "256", "--device", "cpu"]


def run_example(script: str, tmp_path: Path, *extra: str) -> tuple[Path, str]:
    """Import examples/<script>.py and run its main(); returns the trace folder."""
    sys.path.insert(0, str(EXAMPLES))  # the scripts import their neighbour `common`
    try:
        spec = importlib.util.spec_from_file_location(
            f"example_{script}", EXAMPLES / f"{script}.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        out = tmp_path / script
        assert module.main([*SMALL, "--out", str(out), *extra]) == 0
    finally:
        sys.path.remove(str(EXAMPLES))
        sys.modules.pop("common", None)  # the examples' helper, not to be seen by other tests
    return out


def verdict(a: Path, b: Path, **kwargs: object) -> dict:
    return graddiff.compare(a, b, **kwargs).to_dict()


def first_at(report: dict) -> tuple:
    return report["first"]["step"], report["first"]["kind"], report["first"]["name"]


def causes(report: dict) -> list[str]:
    return [c["cause"] for c in report["diagnosis"]]


def test_q1_separate_models_differ_in_initial_weights(tmp_path, capsys):
    out = run_example("q1_manual_vs_optimizer", tmp_path)
    r = verdict(out / "manual.h5", out / "optimizer.h5")
    assert r["diverged"]
    assert first_at(r) == (0, "param", "fc1.0.weight")
    assert causes(r)[0] == "different_init"
    printed = capsys.readouterr().out
    assert "DIVERGED at step 0: param fc1.0.weight" in printed
    assert "final test accuracy, manual (autograd.grad):" in printed


def test_q1_same_init_differs_only_by_rounding_in_the_update(tmp_path, capsys):
    out = run_example("q1_manual_vs_optimizer", tmp_path, "--same-init", "--exact")
    a, b = out / "manual.h5", out / "optimizer.h5"
    exact = verdict(a, b, exact=True)
    # step 0 starts from the same weights; the two update rules round differently
    assert (exact["first"]["step"], exact["first"]["kind"]) == (1, "param")
    assert causes(exact)[0] == "rounding"
    assert exact["first"]["rel_diff"] < 1e-6
    assert not verdict(a, b)["diverged"]  # three steps: far below the tolerance
    assert "parameters differing bitwise" in capsys.readouterr().out


def test_q2_missing_zero_grad_shows_at_step_1_in_the_gradient(tmp_path):
    out = run_example("q2_missing_zero_grad", tmp_path)
    r = verdict(out / "autograd_grad.h5", out / "backward.h5")
    assert r["diverged"]
    assert r["first"]["step"] == 1
    assert r["first"]["kind"] in ("grad", "autograd_grad")
    assert r["first"]["name"] == "conv1.0.weight"
    assert causes(r)[0] == "grad_accumulation"


def test_q2_with_zero_grad_the_runs_agree(tmp_path):
    out = run_example("q2_missing_zero_grad", tmp_path, "--zero-grad")
    assert verdict(out / "autograd_grad.h5", out / "backward.h5")["verdict"] == "identical"


def test_q3_summed_autograd_grad_equals_accumulated_grad(tmp_path, capsys):
    out = run_example("q3_backward_vs_autograd_grad", tmp_path)
    r = verdict(out / "backward.h5", out / "autograd_grad.h5")
    assert r["verdict"] == "identical"
    printed = " ".join(capsys.readouterr().out.split())
    assert "trunk.0.weight (Linear) 2 autograd.grad call(s) in B equal" in printed


def test_q3_forgotten_branch_is_pinpointed_in_the_shared_trunk(tmp_path, capsys):
    out = run_example("q3_backward_vs_autograd_grad", tmp_path, "--forget-branch")
    r = verdict(out / "backward.h5", out / "autograd_grad.h5")
    assert r["diverged"]
    assert first_at(r) == (0, "grad", "trunk.0.weight")
    assert causes(r)[0] == "extra_grad_path"
    assert "gradient path into trunk (Sequential) is missing in B" in r["diagnosis"][0]["title"]
    printed = " ".join(capsys.readouterr().out.split())
    assert "parity.weight (Linear) 1 autograd.grad call(s) in B equal" in printed  # heads agree
    assert "trunk.1.weight (BatchNorm1d) 1 autograd.grad call(s) in B rel diff" in printed


@pytest.mark.slow
def test_example_runs_as_a_script(tmp_path):
    proc = subprocess.run(
        [sys.executable, EXAMPLES / "q3_backward_vs_autograd_grad.py", *SMALL, "--out", tmp_path],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "No difference: the runs are bitwise identical" in proc.stdout


def fake_mnist(root: Path, n_train: int = 96, n_test: int = 32) -> None:
    """MNIST's raw idx files with random content: torchvision then loads without a download."""
    import numpy as np

    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        header = np.array([2051, n, 28, 28], ">u4").tobytes()
        (raw / f"{split}-images-idx3-ubyte").write_bytes(header + images.tobytes())
        header = np.array([2049, n], ">u4").tobytes()
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(header + labels.tobytes())


def test_mnist_through_torchvision(tmp_path):
    pytest.importorskip("torchvision")
    fake_mnist(tmp_path / "data")
    out = run_example(
        "q2_missing_zero_grad", tmp_path, "--data", "mnist", "--root", str(tmp_path / "data")
    )
    r = verdict(out / "autograd_grad.h5", out / "backward.h5")
    assert (r["first"]["step"], r["first"]["name"]) == (1, "conv1.0.weight")
