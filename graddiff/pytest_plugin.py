"""The pytest plugin (entry point ``pytest11``): the ``graddiff_golden`` fixture and
``--graddiff-regen``.

Installing graddiff is enough: pytest loads this module in every session, so it imports nothing
heavy at load time (graddiff.testing, numpy and h5py load when a test first uses the fixture).
Golden files live in ``golden/<test module>/<test name>.h5`` next to the test module.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest

_WRITTEN = pytest.StashKey[list]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("graddiff", "graddiff golden runs")
    group.addoption(
        "--graddiff-regen",
        action="store_true",
        default=False,
        help="Write or refresh the golden trace files of graddiff_golden tests instead of "
        "comparing against them.",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_WRITTEN] = []


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


@pytest.fixture
def graddiff_golden(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """Record the test's training and assert it against the test's golden trace file.

    Usage::

        def test_training_matches(graddiff_golden):
            model = make_model()
            with graddiff_golden(model):
                train(model, steps=5)

    Run ``pytest --graddiff-regen`` to write or refresh the golden files.
    """
    from graddiff.testing import GoldenRun

    config = request.config
    module = Path(str(request.node.path))
    root = Path(str(config.rootpath))
    regen = bool(config.getoption("graddiff_regen"))
    # "TestClass::test_x[param]": two classes may have tests of the same name in one module.
    test_id = request.node.nodeid.split("::", 1)[-1]
    target = shlex.quote(f"{_rel(module, Path.cwd())}::{test_id}")
    command = f"pytest {target} --graddiff-regen"
    written: list = config.stash[_WRITTEN]
    return GoldenRun(
        module.parent / "golden" / module.stem,
        test_id.replace("::", "."),
        tmp_path,
        regen=regen,
        regen_command=command,
        on_written=lambda p: written.append(_rel(p, root)),
    )


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    written = config.stash.get(_WRITTEN, [])
    if config.getoption("graddiff_regen") or written:
        terminalreporter.section("graddiff golden files")
        if written:
            terminalreporter.write_line(f"wrote {len(written)} golden file(s):")
            for path in written:
                terminalreporter.write_line(f"  {path}")
        else:
            terminalreporter.write_line(
                "--graddiff-regen: no graddiff_golden test ran; nothing written"
            )
