"""Float32 matmul/convolution precision settings: both torch APIs recorded (the legacy
``allow_tf32`` flags and torch >= 2.9's per-backend ``fp32_precision``), read by the precision
of a pair and by the environment diff (graddiff/environment.py, diff/precision.py).

Setting these flags on CPU is allowed; every test restores them (and torch refuses to read a
legacy flag after the new API set it, so a mixed state must not leak into other tests)."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graddiff
from graddiff.diff.precision import _tf32, fp32_setting
from graddiff.environment import FP32_PRECISION

pytestmark = pytest.mark.skipif(
    not hasattr(torch.backends.mkldnn, "matmul"), reason="torch < 2.9: no fp32_precision API"
)


def _objects():
    out = {}
    for key, path in FP32_PRECISION:
        obj = torch.backends
        for part in path:
            obj = getattr(obj, part)
        out[key] = obj
    return out


@contextlib.contextmanager
def restored():
    """Put every fp32_precision setting back to what it was (legacy flags follow them)."""
    objs = _objects()
    saved = {k: o.fp32_precision for k, o in objs.items()}
    legacy = torch.get_float32_matmul_precision()
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(legacy)
        for k in ("",) + tuple(k for k in saved if k):  # the generic default first
            objs[k].fp32_precision = saved[k]
        assert torch.get_float32_matmul_precision() == legacy
        assert {k: o.fp32_precision for k, o in objs.items()} == saved


def _env(tmp_path, name="r.h5") -> dict:
    path = tmp_path / name
    with graddiff.trace(nn.Linear(4, 2), path):
        pass
    with graddiff.open(path) as run:
        return dict(run.environment)


def test_default_settings_are_recorded_through_both_apis(tmp_path):
    env = _env(tmp_path)
    assert env["float32_matmul_precision"] == "highest"
    assert env["tf32_matmul"] is False and isinstance(env["tf32_cudnn"], bool)
    for key, _ in FP32_PRECISION:
        name = f"fp32_precision_{key}" if key else "fp32_precision"
        assert env[name] == _objects()[key].fp32_precision, name


def test_new_api_settings_are_recorded_and_trace_entry_survives_the_mixed_state(tmp_path):
    """After ``cuda.matmul.fp32_precision = "tf32"`` torch raises on reading the legacy
    ``allow_tf32`` and ``get_float32_matmul_precision()``: recorded as None, no error."""
    with restored():
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        with pytest.raises(RuntimeError):
            torch.backends.cuda.matmul.allow_tf32  # noqa: B018  (torch's own refusal)
        env = _env(tmp_path)
    assert env["fp32_precision_cuda_matmul"] == "tf32"
    assert env["fp32_precision_mkldnn_matmul"] == "bf16"
    assert env["fp32_precision_cudnn_conv"] == "ieee"
    assert env["tf32_matmul"] is None and env["float32_matmul_precision"] is None


def test_legacy_api_settings_are_recorded(tmp_path):
    with restored():
        torch.set_float32_matmul_precision("medium")
        env = _env(tmp_path)
    assert env["float32_matmul_precision"] == "medium"
    assert env["fp32_precision_mkldnn_matmul"] == "bf16"  # torch maps "medium" to oneDNN bf16
    assert env["fp32_precision_cuda_matmul"] == "tf32"


def _run(env: dict) -> SimpleNamespace:
    return SimpleNamespace(environment=env)


@pytest.mark.parametrize(
    ("env", "precision"),
    [
        ({"device": "cuda:0", "fp32_precision_cuda_matmul": "tf32"}, "tfloat32"),
        ({"device": "cuda:0", "float32_matmul_precision": "high"}, "tfloat32"),
        ({"device": "cuda:0", "tf32_matmul": True}, "tfloat32"),  # a trace from before 2.9
        ({"device": "cuda:0", "fp32_precision_cudnn": "tf32"}, "tfloat32"),  # conv inherits
        (
            {
                "device": "cuda:0",
                "tf32_matmul": None,
                "tf32_cudnn": False,
                "fp32_precision_cuda_matmul": "ieee",
                "fp32_precision_cudnn_conv": "ieee",
            },
            "float32",
        ),
        ({"device": "cpu", "fp32_precision_mkldnn_matmul": "bf16"}, "bfloat16"),
        (
            {"device": "cpu", "fp32_precision_mkldnn_matmul": "none", "fp32_precision": "bf16"},
            "bfloat16",
        ),
        ({"device": "cpu", "fp32_precision_mkldnn_conv": "tf32"}, "tfloat32"),
        ({"device": "cpu", "fp32_precision_cuda_matmul": "tf32"}, "float32"),  # not on CPU
        ({"device": "cpu"}, "float32"),
    ],
)
def test_the_pairs_precision_reads_both_apis(env, precision):
    assert _tf32(_run(env), "float32") == precision
    assert _tf32(_run(env), "bfloat16") == "bfloat16"  # a lower recorded dtype stays


def test_fp32_setting_inherits_from_backend_then_generic():
    env = {"fp32_precision_mkldnn_matmul": "none", "fp32_precision_mkldnn": "none"}
    assert fp32_setting(env, "mkldnn", "matmul") is None
    assert fp32_setting({**env, "fp32_precision": "tf32"}, "mkldnn", "matmul") == "tf32"
    assert fp32_setting({**env, "fp32_precision_mkldnn": "bf16"}, "mkldnn", "matmul") == "bf16"


def _train(path, *, mkldnn_bf16: bool) -> str:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 4))
    o = torch.optim.SGD(net.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    with restored():
        if mkldnn_bf16:
            torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        with graddiff.trace(net, path, values="full"):
            for _ in range(3):
                x, y = torch.randn(64, 256, generator=g), torch.randint(0, 4, (64,), generator=g)
                o.zero_grad()
                F.cross_entropy(net(x), y).backward()
                o.step()
    return str(path)


def test_a_real_cpu_pair_with_onednn_bf16_allowed(tmp_path):
    """A runs with the defaults, B with ``mkldnn.matmul.fp32_precision = "bf16"``: B is judged
    in bfloat16 (allowed), the environment diff names the setting, and --exact calls the
    difference rounding with that setting as its evidence. The oracle: this test's own
    matmul with and without the setting (on a CPU whose oneDNN ignores it the pair is
    bitwise identical)."""
    a = _train(tmp_path / "a.h5", mkldnn_bf16=False)
    b = _train(tmp_path / "b.h5", mkldnn_bf16=True)
    torch.manual_seed(1)
    x, w = torch.randn(64, 256), torch.randn(64, 256)
    plain = F.linear(x, w)
    with restored():
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        allowed = F.linear(x, w)
    changes = not torch.equal(plain, allowed)
    r = graddiff.compare(a, b)
    assert r.precision["b"] == "bfloat16" and r.precision["a"] == "float32"
    rows = {row["key"]: row for row in r.environment_diff}
    assert (
        rows["fp32_precision_mkldnn_matmul"]["b"] == "bf16"
        and rows["fp32_precision_mkldnn_matmul"]["relevant"]
    )
    if not changes:
        assert r.verdict == "identical", r.headline()
        return
    assert r.verdict == "within_tolerance" and r.exit_code == 0, r.headline()
    assert r.headline().startswith("Within bfloat16 precision")
    exact = graddiff.compare(a, b, exact=True)
    assert exact.verdict == "diverged" and exact.first.step == 0, exact.headline()
    assert exact.cause.cause == "rounding", exact.diagnosis[:1]
    assert any("fp32_precision_mkldnn_matmul none vs bf16" in e for e in exact.cause.evidence)
