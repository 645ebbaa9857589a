"""``graddiff check`` on real traces of tiny CPU training loops (graddiff.trace around them)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import graddiff  # noqa: E402


def train(
    path,
    *,
    zero_grad=True,
    values="auto",
    kinds=None,
    optimizer="sgd",
    steps=8,
    freeze=False,
    lr=0.05,
):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    params = list(model.parameters())[:-1] if freeze else model.parameters()
    opt = (
        torch.optim.SGD(params, lr=lr)
        if optimizer == "sgd"
        else torch.optim.Adam(params, lr=lr / 10)
    )
    gen = torch.Generator().manual_seed(1)
    with graddiff.trace(model, path, values=values, kinds=kinds):
        for _ in range(steps):
            x = torch.randn(32, 6, generator=gen)
            y = torch.randint(0, 3, (32,), generator=gen)
            if zero_grad:
                opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return str(path)


LOOPS = {
    "sgd-full": {},
    "adam-full": {"optimizer": "adam"},
    "sgd-stats": {"values": "stats"},
    "adam-stats-no-grad_output": {
        "optimizer": "adam",
        "values": "stats",
        "kinds": "param,loss,grad",
        "steps": 16,
    },
}


@pytest.mark.parametrize("loop", list(LOOPS), ids=list(LOOPS))
def test_correct_loop_is_clean(tmp_path, loop):
    with graddiff.open(train(tmp_path / "run.h5", **LOOPS[loop])) as run:
        report = run.check()
    assert report.clean, [str(f) for f in report]


@pytest.mark.parametrize("loop", list(LOOPS), ids=list(LOOPS))
def test_loop_without_zero_grad_is_flagged(tmp_path, loop):
    with graddiff.open(train(tmp_path / "run.h5", zero_grad=False, **LOOPS[loop])) as run:
        found = run.check().of_kind("grad_accumulation")
    assert len(found) == 1 and found[0].record_kind == "grad"


def test_parameter_left_out_of_the_optimizer_is_frozen(tmp_path):
    with graddiff.open(train(tmp_path / "run.h5", freeze=True)) as run:
        (f,) = run.check()
    assert (f.kind, f.name) == ("frozen_param", "2.bias")


@pytest.mark.slow
def test_real_compare_html_renders_in_headless_chromium(tmp_path):
    """`graddiff compare --html` on two real traces, rendered by a real browser."""
    import html as html_module

    from browser import distinct_colours, find_chromium, screenshot
    from click.testing import CliRunner

    from graddiff.cli import main

    if find_chromium() is None:
        pytest.skip("no chromium found (CI installs it in .ci/run)")
    good = train(tmp_path / "good.h5")
    bad = train(tmp_path / "bad.h5", zero_grad=False)
    page = tmp_path / "report.html"
    result = CliRunner().invoke(main, ["compare", good, bad, "--html", str(page)])
    assert result.exit_code == 1, result.output
    text = html_module.unescape(page.read_text())
    assert "step 1" in text and "zero_grad" in text and 'id="heat-diff"' in text
    img = screenshot(page, tmp_path)
    assert img.shape[:2] == (1600, 1200)
    assert distinct_colours(img) > 50
