"""Golden-run tests end to end: real pytest sessions (pytester) using the graddiff_golden
fixture that the installed ``pytest11`` entry point provides, and assert_runs_match directly."""

from __future__ import annotations

import configparser
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from torch import nn

import graddiff
from graddiff.testing import assert_runs_match

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]

# The entry point is what users get; a worktree whose editable install predates it loads the
# plugin explicitly so the end-to-end tests still run (test_entry_point_* check the declaration).
_INSTALLED = any(e.value == "graddiff.pytest_plugin" for e in entry_points(group="pytest11"))
PLUGIN = [] if _INSTALLED else ["-p", "graddiff.pytest_plugin"]

TRAINING = """
import os
import torch
from torch import nn

def make_model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))

def train(model, steps=int(os.environ.get("STEPS", 4)), lr=float(os.environ.get("LR", 0.1))):
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        x, y = torch.randn(8, 4), torch.randn(8, 2)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        if os.environ.get("BOOM"):
            raise RuntimeError("boom in the training loop")
        opt.step()
"""

# What a user writes: five lines.
GOLDEN_TEST = """
from training import make_model, train

def test_training_matches_golden(graddiff_golden):
    model = make_model()
    with graddiff_golden(model):
        train(model)
"""

EXACT_TEST = """
from training import make_model, train

def test_bitwise(graddiff_golden):
    model = make_model()
    with graddiff_golden(model, exact=True):
        train(model)
"""

GOLDEN = Path("golden/test_golden/test_training_matches_golden.h5")


@pytest.fixture(scope="module")
def _warm(tmp_path_factory):
    """In-process pytester sessions drop the modules they imported when they end; a first trace
    in this process imports torch's lazily loaded modules (~900) once, so that no inner session
    imports them again (torch refuses a second registration of its operator libraries)."""
    _record(tmp_path_factory.mktemp("warm") / "warm.h5")


@pytest.fixture
def project(pytester, _warm):
    pytester.makepyfile(training=TRAINING, test_golden=GOLDEN_TEST)
    pytester.syspathinsert()
    return pytester


def run(pytester, *args, **env):
    mp = pytest.MonkeyPatch()
    try:
        for k in ("LR", "STEPS", "BOOM"):
            mp.delenv(k, raising=False)
        for k, v in env.items():
            mp.setenv(k, str(v))
        return pytester.runpytest(*PLUGIN, "-p", "no:cacheprovider", *args)
    finally:
        mp.undo()


def test_missing_golden_fails_with_the_command_that_creates_it(project):
    result = run(project)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*golden file *test_training_matches_golden.h5 does not exist; create it with:*",
            "*pytest test_golden.py::test_training_matches_golden --graddiff-regen*",
        ]
    )
    assert not (project.path / GOLDEN).exists()


def test_regen_writes_then_the_same_training_passes(project):
    result = run(project, "--graddiff-regen")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        ["*graddiff golden files*", "wrote 1 golden file(s):", f"  {GOLDEN.as_posix()}"]
    )
    golden = project.path / GOLDEN
    with graddiff.open(golden) as g:
        assert list(g.steps) == [0, 1, 2, 3] and g.complete
        assert g.has_values("param", "0.weight", 0) and not g.has_values("param", "0.weight", 1)
    # Small: the writer's table chunks (sized for long runs) are not copied into golden files.
    assert golden.stat().st_size < 40_000, golden.stat().st_size
    run(project).assert_outcomes(passed=1)
    # A second regen refreshes the file and says so again.
    before = golden.stat().st_mtime_ns
    run(project, "--graddiff-regen").stdout.fnmatch_lines(["wrote 1 golden file(s):"])
    assert golden.stat().st_mtime_ns >= before


def test_a_planted_change_fails_with_a_readable_report(project):
    run(project, "--graddiff-regen").assert_outcomes(passed=1)
    result = run(project, LR=0.2)
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    result.stdout.fnmatch_lines(
        [
            "E *DIVERGED at step *",
            "E *A (golden): *test_training_matches_golden.h5",
            "E *B (actual): *actual.h5",
            "E *First divergence: *",
            "E *Full report: graddiff compare *test_training_matches_golden.h5 *actual.h5",
            "E *refresh the golden file: pytest test_golden.py::test_training_matches_golden --graddiff-regen",
        ]
    )
    # pytest's traceback stops at the user's `with` line: graddiff's frames are hidden.
    assert "graddiff/testing.py" not in out and "contextlib" not in out
    result.stdout.fnmatch_lines(
        [">       with graddiff_golden(model):", "E       AssertionError: DIVERGED*"]
    )


@pytest.mark.parametrize(
    "steps, word",
    [(3, "missing from the actual run: step 3"), (6, "not in the golden run: steps 4..5")],
    ids=["shorter", "longer"],
)
def test_a_shorter_or_longer_run_fails(project, steps, word):
    run(project, "--graddiff-regen").assert_outcomes(passed=1)
    result = run(project, STEPS=steps)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [f"E *LENGTH MISMATCH: the actual run has {steps} step(s), the golden run 4; {word}*"]
    )


def test_the_trainings_own_exception_is_never_hidden(project):
    run(project, "--graddiff-regen").assert_outcomes(passed=1)
    result = run(project, BOOM=1)
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    result.stdout.fnmatch_lines(["E *RuntimeError: boom in the training loop"])
    assert "DIVERGED" not in out and "golden file" not in out


def test_exact_mode_fails_on_a_rounding_level_change_that_approximate_mode_accepts(project):
    project.makepyfile(test_exact=EXACT_TEST)
    run(project, "--graddiff-regen").assert_outcomes(passed=2)
    nudged = 0.1 * (1 + 3e-7)  # a float32 rounding-level change of the learning rate
    result = run(project, LR=nudged)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*FAILED test_exact.py::test_bitwise*"])
    result.stdout.fnmatch_lines(["E *(*any bitwise difference (--exact))*"])


# -- assert_runs_match on its own ------------------------------------------------------------


def _record(path, lr=0.1, steps=3):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    torch.manual_seed(0)
    with graddiff.trace(model, path, full_steps=[0]):
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.mse_loss(model(torch.randn(8, 4)), torch.randn(8, 2)).backward()
            opt.step()
    return path


def test_assert_runs_match(tmp_path):
    golden = _record(tmp_path / "golden.h5")
    report = assert_runs_match(_record(tmp_path / "same.h5"), golden, exact=True)
    assert report.verdict == "identical"
    with pytest.raises(
        AssertionError, match=r"(?s)DIVERGED at step 1: .*A \(golden\): .*golden\.h5"
    ):
        assert_runs_match(_record(tmp_path / "lr.h5", lr=0.3), golden)
    # kinds and steps narrow what is compared: step 0 is identical whatever the learning rate.
    assert assert_runs_match(tmp_path / "lr.h5", golden, steps="0:0").verdict == "identical"
    with pytest.raises(AssertionError, match="LENGTH MISMATCH: the actual run has 2 step"):
        assert_runs_match(_record(tmp_path / "short.h5", steps=2), golden)
    with pytest.raises(graddiff.GraddiffError, match="nope.h5"):
        assert_runs_match(tmp_path / "nope.h5", golden)


def test_entry_point_is_declared():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert "graddiff = graddiff.pytest_plugin" in cfg["options.entry_points"]["pytest11"]


def test_plugin_loads_without_heavy_imports(pytester):
    """pytest loads the plugin in every session of every user: it must not import torch (3-4 s);
    numpy and h5py come with the graddiff package itself (0.3 s)."""
    pytester.makepyfile(
        test_light="""
import sys
def test_light():
    assert "graddiff.pytest_plugin" in sys.modules
    assert "torch" not in sys.modules
"""
    )
    pytester.runpytest_subprocess(*PLUGIN, "-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_classes_and_parameters_get_their_own_golden_files(project):
    project.makepyfile(
        test_many="""
import pytest
from training import make_model, train

class TestA:
    def test_run(self, graddiff_golden):
        model = make_model()
        with graddiff_golden(model):
            train(model, steps=2)

@pytest.mark.parametrize("lr", [0.1, 0.2])
def test_lr(graddiff_golden, lr):
    model = make_model()
    with graddiff_golden(model):
        train(model, steps=2, lr=lr)
"""
    )
    result = run(project, "test_many.py")
    result.assert_outcomes(failed=3)
    assert "pytest 'test_many.py::test_lr[0.1]' --graddiff-regen" in result.stdout.str()
    assert "pytest test_many.py::TestA::test_run --graddiff-regen" in result.stdout.str()
    run(project, "test_many.py", "--graddiff-regen").stdout.fnmatch_lines(
        [
            "wrote 3 golden file(s):",
            "  golden/test_many/TestA.test_run.h5",
            "  golden/test_many/test_lr_0.1.h5",
            "  golden/test_many/test_lr_0.2.h5",
        ]
    )
    run(project, "test_many.py").assert_outcomes(passed=3)
