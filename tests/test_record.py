"""graddiff record: unmodified scripts traced, models found through their optimizers, the
script's exit code passed through, one clear line for every bad input."""

from __future__ import annotations

import io
import os
import runpy
import subprocess
import sys
import textwrap
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import graddiff
from graddiff.cli import main

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT / "tests" / "scripts" / "mnist_argparse.py"
EXAMPLES = ROOT / "examples"


def record(*args: str, cwd: Path):
    """``graddiff record ARGS`` in this process (CliRunner), from ``cwd``."""
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(main, ["record", *args], catch_exceptions=False)
    finally:
        os.chdir(old)


def script(tmp_path: Path, text: str, name: str = "train.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_lr_change_found_with_no_code_edit(tmp_path):
    a = record("-o", "a.h5", "--", "python", str(MNIST), "--lr", "0.1", cwd=tmp_path)
    b = record("-o", "b.h5", "--", "python", str(MNIST), "--lr", "0.2", cwd=tmp_path)
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    assert "graddiff record: recording Net into a.h5" in a.stderr
    with graddiff.open(tmp_path / "a.h5") as run:
        assert run.complete and list(run.steps) == [0, 1, 2, 3]  # 64 samples, batch 16
        assert "conv1.weight" in run.names("grad")
    report = graddiff.compare(tmp_path / "a.h5", tmp_path / "b.h5")
    assert report.diverged and report.first.step == 1
    assert "learning rate" in report.cause.title, report.cause  # the planted difference, named
    # Observe, never perturb: the script prints the same losses with and without graddiff.
    plain = io.StringIO()
    argv = sys.argv[:]
    sys.argv = [str(MNIST), "--lr", "0.1"]
    try:
        with redirect_stdout(plain):
            runpy.run_path(str(MNIST), run_name="__main__")
    finally:
        sys.argv = argv
    assert a.stdout == plain.getvalue() and "Loss:" in a.stdout


def test_everything_restored_after_the_script(tmp_path):
    before = (torch.optim.Optimizer.__init__, sys.argv[:], sys.path[:], sys.modules["__main__"])
    result = record("-o", "r.h5", "--", str(MNIST), "--train-size", "16", cwd=tmp_path)
    assert result.exit_code == 0, result.output
    after = (torch.optim.Optimizer.__init__, sys.argv[:], sys.path[:], sys.modules["__main__"])
    assert after == before


def test_python_dash_m_passes_the_scripts_exit_code(tmp_path):
    """`python -m graddiff record` in a real process (its tmp_path name avoids "graddiff":
    tests/test_writer_lock.py looks for leftover files with that word beside its own)."""
    proc = subprocess.run(
        [sys.executable, "-m", "graddiff", "record", "-o", "run_{rank}.h5", "--", "python",
         str(MNIST), "--train-size", "32", "--exit-code", "3"],
        cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "RANK": "1"}, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    with graddiff.open(tmp_path / "run_1.h5") as run:  # {rank} from the launcher's RANK
        assert len(run.steps) == 2 and run.status.startswith("aborted")


def test_no_command(tmp_path):
    result = record("-o", "r.h5", cwd=tmp_path)
    assert result.exit_code == 2
    assert (
        result.stderr
        == "Error: no command to run: graddiff record -o run.h5 -- python train.py [ARGS]\n"
    )


@pytest.mark.parametrize(
    "command, message",
    [
        (
            ["torchrun", "train.py"],
            "Error: torchrun: no such script (graddiff record runs a Python script in its own process; under torchrun: torchrun ... -m graddiff record",
        ),
        (["python", "missing.py"], "Error: missing.py: no such script\n"),
        (["python", "-X", "dev", "t.py"], "Error: python option '-X' is not supported"),
        (["python", "-m"], "Error: -m needs a module name"),
    ],
    ids=["launcher", "missing", "python-option", "dash-m"],
)
def test_bad_commands_are_one_line(tmp_path, command, message):
    result = record("-o", "r.h5", "--", *command, cwd=tmp_path)
    assert result.exit_code == 2
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1
    assert not (tmp_path / "r.h5").exists()


def test_script_failing_before_training_keeps_its_traceback_and_exit_code(tmp_path):
    result = record(
        "-o", "r.h5", "--", "python", str(MNIST), "--fail-before-training", cwd=tmp_path
    )
    assert result.exit_code == 1  # Python's exit code for an uncaught exception
    err = result.stderr
    assert err.startswith("Traceback (most recent call last):")
    assert "FileNotFoundError: ../data/MNIST/raw/train-images-idx3-ubyte" in err
    assert "runpy" not in err and "graddiff/record.py" not in err  # the script's frames only
    assert err.rstrip().splitlines()[-1] == (
        "graddiff record: nothing recorded: the script exited with code 1 before training started "
        "(the script created no optimizer (graddiff record finds models through the optimizer "
        "their parameters are handed to))"
    )
    assert not (tmp_path / "r.h5").exists()


def test_argparse_error_is_the_scripts_exit_code(tmp_path):
    result = record("-o", "r.h5", "--", "python", str(MNIST), "--no-such-flag", cwd=tmp_path)
    assert result.exit_code == 2 and "unrecognized arguments: --no-such-flag" in result.stderr


def test_no_model_found(tmp_path):
    manual = script(
        tmp_path,
        """
        import torch
        w = torch.zeros(3, requires_grad=True)
        for _ in range(2):
            (w * torch.ones(3)).sum().backward()
            with torch.no_grad():
                w -= 0.1 * w.grad
        """,
    )
    result = record("-o", "r.h5", "--", "python", str(manual), cwd=tmp_path)
    assert result.exit_code == 2
    assert result.stderr == (
        "Error: no model found: the script created no optimizer (graddiff record finds models "
        "through the optimizer their parameters are handed to); nothing recorded. Name it with "
        "--model-class NAME or --model MODULE.ATTR, or wrap the training loop in "
        "graddiff.trace(model, path)\n"
    )


GAN = """
import torch
from torch import nn

class Generator(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 4))
    def forward(self, z):
        return self.net(z)

torch.manual_seed(0)
gen = Generator()
disc = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
loose = torch.zeros(1, requires_grad=True)            # a parameter no module owns
opt_g = torch.optim.Adam([*gen.parameters(), loose], lr=1e-3)
opt_d = torch.optim.SGD(disc.parameters(), lr=1e-2)
for _ in range(3):
    fake = gen(torch.randn(8, 2))
    opt_d.zero_grad()
    disc(fake.detach()).mean().backward()
    opt_d.step()
    opt_g.zero_grad()
    (-disc(fake).mean() + loose.sum()).backward()
    opt_g.step()
"""


def test_two_models_two_files_and_one_warning_for_what_has_no_name(tmp_path):
    gan = script(tmp_path, GAN)
    result = record("-o", "gan.h5", "--", "python", str(gan), cwd=tmp_path)
    assert result.exit_code == 0, result.output
    assert result.stderr.count("belong to no nn.Module") == 1
    assert "1 optimizer parameter(s) belong to no nn.Module; they are not recorded" in result.stderr
    assert "recording Generator into gan.h5" in result.stderr
    assert "recording Sequential into gan.Sequential.h5" in result.stderr
    with (
        graddiff.open(tmp_path / "gan.h5") as g,
        graddiff.open(tmp_path / "gan.Sequential.h5") as d,
    ):
        assert "net.0.weight" in g.names("param") and "0.weight" in d.names("param")
        assert len(g.steps) == 3 and list(d.steps[:3]) == [0, 1, 2]


@pytest.mark.parametrize(
    "choice, expected",
    [(["--model-class", "Generator"], "net.0.weight"), (["--model", "__main__.disc"], "0.weight")],
    ids=["model-class", "model-attr"],
)
def test_explicit_model(tmp_path, choice, expected):
    gan = script(tmp_path, GAN)
    result = record("-o", "one.h5", *choice, "--kinds", "param,grad", "--", str(gan), cwd=tmp_path)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.glob("*.h5")) == ["one.h5"]
    with graddiff.open(tmp_path / "one.h5") as run:
        assert run.kinds == ["param", "grad"] and expected in run.names("param")


def test_explicit_model_not_found(tmp_path):
    gan = script(tmp_path, GAN)
    result = record("-o", "r.h5", "--model-class", "Critic", "--", str(gan), cwd=tmp_path)
    assert result.exit_code == 2
    assert result.stderr.startswith(
        "Error: no model found: no optimizer was handed the parameters of Critic"
    )


def test_script_tracing_itself_keeps_its_own_trace(tmp_path):
    """An optimizer built before the script's own graddiff.trace: record gives way to it."""
    own = script(
        tmp_path,
        """
        import torch, graddiff
        from torch import nn
        model = nn.Linear(3, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with graddiff.trace(model, "own.h5"):
            for _ in range(2):
                opt.zero_grad(); model(torch.randn(4, 3)).sum().backward(); opt.step()
        """,
    )
    result = record("-o", "r.h5", "--", "python", str(own), cwd=tmp_path)
    assert result.exit_code == 0, result.output
    assert (
        "Linear is traced by the script itself (graddiff.trace); record leaves it to the script"
        in result.stderr
    )
    assert not (tmp_path / "r.h5").exists()
    with graddiff.open(tmp_path / "own.h5") as run:
        assert len(run.steps) == 2 and run.complete


@pytest.mark.parametrize(
    "example, says, verdict",
    [
        ("q1_manual_vs_optimizer", "Model is traced by the script itself", "DIVERGED at step 0"),
        (
            "q2_missing_zero_grad",
            "nothing recorded by graddiff record: the script traced its models itself (2 graddiff.trace block(s))",
            "DIVERGED at step 1",
        ),
    ],
    ids=["q1-optimizer", "q2-manual-updates"],
)
def test_repository_examples_run_under_record(tmp_path, example, says, verdict):
    """The examples trace their runs themselves; under record they behave exactly as alone."""
    result = record(
        "-o", "r.h5", "--", "python", str(EXAMPLES / f"{example}.py"),
        "--steps", "2", "--width", "16", "--batch", "16", "--train-size", "64", "--device", "cpu",
        "--out", str(tmp_path / "out"),
        cwd=tmp_path,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert says in result.stderr
    assert verdict in result.stdout  # the script's own verdict
    assert len(list((tmp_path / "out").glob("*.h5"))) == 2 and not (tmp_path / "r.h5").exists()


@pytest.mark.slow
def test_rank_under_torchrun(tmp_path):
    """Inside the launcher, one file per rank: torchrun -m graddiff record -o run_{rank}.h5."""
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "graddiff",
         "record", "-o", "run_{rank}.h5", "--", str(MNIST), "--train-size", "32"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for rank in (0, 1):
        assert f"recording Net into run_{rank}.h5" in proc.stderr
    # Both ranks ran the same (non-distributed) script from the same seed: identical runs.
    report = graddiff.compare(tmp_path / "run_0.h5", tmp_path / "run_1.h5", exact=True)
    assert report.verdict == "identical" and report.steps["compared"] == 2


def test_python_dash_m_module(tmp_path):
    script(tmp_path, GAN, name="gan_module.py")
    result = record(
        "-o", "m.h5", "--model-class", "Generator", "--", "python", "-m", "gan_module", cwd=tmp_path
    )
    assert result.exit_code == 0, result.output
    assert "recording Generator into m.h5" in result.stderr
    assert "gan_module" not in sys.modules  # the script's module does not outlive the run


def test_output_folder_missing(tmp_path):
    result = record("-o", "nowhere/r.h5", "--", str(MNIST), cwd=tmp_path)
    assert result.exit_code == 2
    assert (
        result.stderr == f"Error: -o nowhere/r.h5: the folder {tmp_path}/nowhere does not exist\n"
    )


LIGHTNING_SUBMODULE = """
import sys, warnings
import torch
import torch.nn.functional as F
from torch import nn
import lightning.pytorch as L

class Model(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x), y)  # the LightningModule's own forward never runs
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

g = torch.Generator().manual_seed(1)
data = torch.utils.data.TensorDataset(torch.randn(32, 6, generator=g), torch.randn(32, 2, generator=g))
loader = torch.utils.data.DataLoader(
    data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(int(sys.argv[1]))
)
warnings.filterwarnings("ignore")
trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)
trainer.fit(Model(), loader)
"""


def test_lightning_training_step_calling_a_submodule_records_its_inputs(tmp_path):
    """The traced model is the LightningModule, the forward goes to ``self.net``: the inputs
    are ``self.net``'s arguments, in every step, and a data-order bug is named from them."""
    pytest.importorskip("lightning.pytorch")
    train = script(tmp_path, LIGHTNING_SUBMODULE)
    for name, seed in (("a.h5", "0"), ("b.h5", "1")):
        result = record("-o", name, "--", "python", str(train), seed, cwd=tmp_path)
        assert result.exit_code == 0, result.output
    with graddiff.open(tmp_path / "a.h5") as run:
        assert list(run.steps) == [0, 1, 2, 3] and run.names("input") == ["net:0"]
        assert all(run.stats("input", "net:0", int(s))["numel"] == 8 * 6 for s in run.steps)
    report = graddiff.compare(tmp_path / "a.h5", tmp_path / "b.h5")
    assert report.first.step == 0 and report.first.kind == "input"
    assert "different data order" in report.cause.title, report.cause
