"""Fuzz: damaged real traces through every command and the Python API, within a CI budget.

Each run is a forked child of this process (tests/fuzzing.py) killed after ``TIMEOUT`` s: it
must exit 0, 1 or 2, print one ``Error:`` line on exit 2, no traceback, and nothing from outside
the trace. The larger campaign (500+ files) is ``scripts/fuzz_campaign.py``; its figures are in
docs/robustness.md.
"""

from __future__ import annotations

import os
import random

import fuzzing
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the harness forks")

TIMEOUT = 60.0
#: Every command runs on the undamaged traces; damaged ones get these in CI (the campaign
#: runs them all).
CI_COMMANDS = {"show", "inspect --values --json", "check --json", "compare good bad", "plot"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    work = str(tmp_path_factory.mktemp("fuzz"))
    old = os.environ.get("GRADDIFF_WATCHDOG")
    os.environ["GRADDIFF_WATCHDOG"] = "5"
    fuzzing.prepare(work)
    a, b = fuzzing.record_real_traces(work)
    yield {
        "work": work,
        "a": a,
        "b": b,
        "regions": {a: fuzzing.regions(a), b: fuzzing.regions(b)},
        "secret": fuzzing.make_secret(work),
    }
    if old is None:
        os.environ.pop("GRADDIFF_WATCHDOG", None)
    else:
        os.environ["GRADDIFF_WATCHDOG"] = old


def _check(outcomes):
    bad = [
        f"{o.command} on {o.case}: {o.problem}\n{o.stderr[-1500:]}" for o in outcomes if o.problem
    ]
    assert not bad, "\n\n".join(bad)


def _all_commands(case, corpus, names=None):
    out = [
        fuzzing.run_cli(case, name, argv, TIMEOUT, corpus["work"])
        for name, argv in fuzzing.commands(case.path, corpus["a"], corpus["work"])
        if names is None or name in names
    ]
    out.append(fuzzing.run_api(case, corpus["a"], TIMEOUT, corpus["work"]))
    return out


def test_real_traces_pass_every_command(corpus):
    case = fuzzing.Case("undamaged", corpus["b"])
    outcomes = _all_commands(case, corpus)
    _check(outcomes)
    assert {o.code for o in outcomes if o.command.startswith("compare good")} == {1}


def test_special_inputs(corpus):
    cases = fuzzing.special_cases(corpus["work"], corpus["a"])
    for case in cases:
        outcomes = _all_commands(case, corpus, CI_COMMANDS)
        _check(outcomes)
        codes = [o.code for o in outcomes if o.command != "python API"]
        assert set(codes) == {2}, (case.name, codes)


@pytest.mark.parametrize("edit", [name for name, _ in fuzzing._structural_edits("x")])
def test_structural_edit(corpus, edit, tmp_path):
    edits = dict(fuzzing._structural_edits(corpus["secret"]))
    dst = str(tmp_path / "edited.h5")
    import shutil

    import h5py

    shutil.copyfile(corpus["a"], dst)
    with h5py.File(dst, "r+") as f:
        edits[edit](f, random.Random(0))
    case = fuzzing.Case(edit, dst)
    _check(_all_commands(case, corpus, {"inspect --values --json", "compare good bad"}))


@settings(
    max_examples=8,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(seed=st.integers(0, 2**32 - 1))
def test_byte_damage(corpus, seed):
    rng = random.Random(seed)
    src = rng.choice([corpus["a"], corpus["b"]])
    out = os.path.join(corpus["work"], "damaged")
    os.makedirs(out, exist_ok=True)
    case = fuzzing.byte_damage(src, corpus["regions"][src], rng, out, seed % 10000)
    _check(_all_commands(case, corpus, CI_COMMANDS))
