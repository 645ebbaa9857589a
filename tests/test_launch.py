"""Per-rank path templates (graddiff.launch) and buffers recorded at the step's start.

The path decision depends only on the template and the launch, so every rank takes the same one
before training starts; the launch is read from torchrun's environment here (the real 2-rank
launch is in tests/test_ranks.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from zoo_models import BNMLP, batches

import graddiff
from graddiff.errors import TraceUsageError
from graddiff.launch import Launch, resolve_path, template_fields

TWO = Launch(rank=1, world_size=2, local_rank=1, local_world_size=2, node=0)
TWO_NODES = Launch(rank=3, world_size=4, local_rank=1, local_world_size=2, node=1)


def test_fields_are_formatted():
    assert resolve_path("r{rank}_of_{world_size}.h5", TWO) == "r1_of_2.h5"
    assert resolve_path("n{node}/l{local_rank:02d}.h5", TWO) == "n0/l01.h5"
    assert resolve_path("n{node}_l{local_rank}.h5", TWO_NODES) == "n1_l1.h5"
    assert resolve_path("{{literal}}_{rank}.h5", TWO) == "{literal}_1.h5"
    assert resolve_path("single.h5", Launch()) == "single.h5"
    assert resolve_path("run_{rank}.h5", Launch()) == "run_0.h5"


@pytest.mark.parametrize("template", ["run_{RANK}.h5", "run_{gpu}.h5", "run_{}.h5", "run_{0}.h5"])
def test_unknown_field_is_one_clear_error(template):
    with pytest.raises(TraceUsageError, match=r"unknown field .*use \{rank\}, \{local_rank\}"):
        template_fields(template)


def test_unbalanced_brace_is_an_error():
    with pytest.raises(TraceUsageError, match="braces"):
        template_fields("run_{rank.h5")


def test_missing_rank_gets_it_inserted_on_every_rank():
    assert resolve_path("out/run.h5", TWO) == "out/run_rank1.h5"
    # local_rank alone is unique on one node, not on several
    assert resolve_path("run_{local_rank}.h5", TWO) == "run_1.h5"
    assert resolve_path("run_{local_rank}.h5", TWO_NODES) == f"run_{1}_rank3.h5"


def test_trace_under_torchrun_environment(tmp_path, monkeypatch):
    """Before init_process_group, torchrun's variables decide; rank 0 warns once."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    model = torch.nn.Linear(3, 2)
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        if rank == 0:
            with pytest.warns(RuntimeWarning, match=r"has no \{rank\} under a launch of 2 ranks"):
                tr = graddiff.trace(model, tmp_path / "run.h5")
        else:
            tr = graddiff.trace(model, tmp_path / "run.h5")  # no warning on other ranks
        assert tr.path == str(tmp_path / f"run_rank{rank}.h5")
    with pytest.raises(TraceUsageError, match="unknown field"):
        graddiff.trace(model, tmp_path / "run_{RANK}.h5")


def test_environment_records_the_launch(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    model = torch.nn.Linear(3, 2)
    with graddiff.trace(model, tmp_path / "r{rank}.h5") as tr:
        model(torch.ones(1, 3)).sum().backward()
    with graddiff.open(tr.path) as run:
        env = run.environment
        assert (env["rank"], env["world_size"], env["local_rank"], env["node"]) == (1, 2, 1, 0)


def test_buffer_start_is_the_buffer_before_the_forward(tmp_path):
    """buffer_start at step k equals buffer (step end) at step k-1, and the initial buffers."""
    torch.manual_seed(0)
    model = BNMLP()
    initial = {n: b.clone() for n, b in model.named_buffers()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with graddiff.trace(model, tmp_path / "a.h5", kinds="param,buffer", values="full"):
        for x, y in batches(3):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    with graddiff.open(tmp_path / "a.h5") as run:
        assert run.kinds == ["param", "buffer_start", "buffer"]
        assert run.options["kinds"] == ["param", "buffer_start", "buffer"]
        for name, value in initial.items():
            np.testing.assert_array_equal(run.get("buffer_start", name, 0), value.numpy())
        name = "fc.0.1.running_mean"
        for step in (1, 2):
            np.testing.assert_array_equal(
                run.get("buffer_start", name, step), run.get("buffer", name, step - 1)
            )
        assert not np.array_equal(run.get("buffer_start", name, 1), run.get("buffer", name, 1))
