"""Record two pairs of runs, write their HTML reports and screenshot them in headless Chromium.

* ``zero-grad``: the missing ``zero_grad()`` pair of ``graddiff demo`` (question 2);
* ``transformer``: a 2-layer GPT-2 (transformers) trained with AdamW, B with learning rate
  2e-3 instead of 3e-3 (123 records: params, input, activations, loss, output grads, grads).

Writes ``report-zero-grad.png``, ``report-transformer.png`` and ``show-transformer.png``
(``graddiff show --html`` of run A) into OUT (default docs/img), and the HTML files beside the
traces in a temporary folder. Needs chromium, chromedriver and selenium.

Usage: python scripts/report_screenshots.py [OUT]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import torch

import graddiff


def gpt2_run(path: str, lr: float, steps: int = 30) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=64,
        n_positions=32,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, 64, (steps, 8, 16), generator=g)
    with graddiff.trace(model, path, kinds="param,input,activation,loss,grad_output,grad"):
        for x in data:
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()


def zero_grad_pair(folder: str) -> tuple[str, str]:
    """The demo's question-2 traces (``graddiff demo --only q2 --keep``)."""
    import subprocess

    keep = os.path.join(folder, "q2")
    cmd = [sys.executable, "-m", "graddiff", "demo", "--only", "q2", "--steps", "20"]
    subprocess.run([*cmd, "--keep", keep], check=True, capture_output=True)
    return os.path.join(keep, "q2_autograd_grad.h5"), os.path.join(keep, "q2_backward.h5")


def shoot(page: str, out: str, width: int = 1280) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tempfile.mkdtemp()}",
        f"--window-size={width},1200",
        "--hide-scrollbars",
    ):
        opts.add_argument(flag)
    opts.binary_location = "/usr/bin/chromium"
    d = webdriver.Chrome(options=opts, service=Service("/usr/bin/chromedriver"))
    try:
        d.get("file://" + os.path.abspath(page))
        time.sleep(1.0)
        height = d.execute_script("return document.body.scrollHeight")
        d.set_window_size(width, height + 20)
        time.sleep(0.5)
        d.save_screenshot(out)
    finally:
        d.quit()
    print("wrote", out)


def main() -> None:
    out = sys.argv[1] if len(sys.argv) > 1 else "docs/img"
    os.makedirs(out, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="graddiff-shots-")
    a, b = os.path.join(tmp, "gpt2_lr3e-3.h5"), os.path.join(tmp, "gpt2_lr2e-3.h5")
    gpt2_run(a, 3e-3)
    gpt2_run(b, 2e-3)
    pairs = {"transformer": (a, b), "zero-grad": zero_grad_pair(tmp)}
    for name, (x, y) in pairs.items():
        page = os.path.join(tmp, f"report-{name}.html")
        graddiff.compare(x, y).html(page)
        shoot(page, os.path.join(out, f"report-{name}.png"))
    from graddiff.postmortem.html import write_run_html

    with graddiff.open(a) as run:
        page = write_run_html(run, os.path.join(tmp, "show-transformer.html"))
    shoot(page, os.path.join(out, "show-transformer.png"))
    print("traces and pages in", tmp)


if __name__ == "__main__":
    main()
