"""``graddiff ranks``: the consistency check of one distributed run's ranks (gloo, CPU).

One launch of 2 ranks and one of 4 record every scenario of tests/scripts/dist_worker.py (each
rank runs them all, so torch is imported once per rank). What must hold: a healthy DDP run with
BatchNorm and per-rank data and dropout seeds (intended) passes; each injected bug is named with
the right rank, step, record and cause; files that are not one run are one ``Error:`` line and
exit 2; a rank killed mid-run is read up to its last complete step.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
from click.testing import CliRunner
from dist_launch import launch

import graddiff
from graddiff.cli import main

pytestmark = pytest.mark.slow

TWO = [
    "healthy",
    "sched",
    "noreduce",
    "localbn",
    "skip",
    "norank",
    "plain",
    "one",
    "fsdp2",
    "fsdp1",
    "fsdp1flat",
    "bnddp",
    "killed",
]
FOUR = ["healthy", "sched", "plain"]


@pytest.fixture(scope="session")
def two(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("two"), 2, TWO, killed_rank=1)


@pytest.fixture(scope="session")
def four(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("four"), 4, FOUR)


def _files(root, scenario, pattern="run_*.h5"):
    return [os.path.join(root, scenario, pattern)]


def _cli(*args):
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


@pytest.mark.parametrize("world", [2, 4])
def test_healthy_run_is_consistent(two, four, world):
    root = two if world == 2 else four
    report = graddiff.check_ranks(_files(root, "healthy"))
    assert report.consistent and report.exit_code == 0, report.to_dict()
    assert report.world_size == world
    assert report.compared == ["param", "buffer_start", "grad"]
    assert report.steps["compared"] == 4
    # BatchNorm buffers (end of step), inputs, activations and losses differ per rank by design
    assert {"input", "activation", "loss", "buffer"} <= set(report.not_compared)


def test_scheduler_on_one_rank(two):
    r = graddiff.check_ranks(_files(two, "sched"))
    assert r.exit_code == 1
    assert (r.first["step"], r.first["kind"], r.first["odd_ranks"]) == (2, "param", [1])
    assert not r.first["strict_majority"]  # 2 ranks: no majority, rank 0 is the reference
    assert r.diagnosis.cause == "rank_local_lr"
    assert "0.5 x rank 0's" in r.diagnosis.title


def test_scheduler_on_one_of_four_ranks_named_by_majority(four):
    r = graddiff.check_ranks(_files(four, "sched"))
    assert (r.first["step"], r.first["kind"], r.first["odd_ranks"]) == (2, "param", [2])
    assert r.first["strict_majority"] and r.first["majority"] == [0, 1, 3]
    assert r.diagnosis.cause == "rank_local_lr"


def test_parameter_left_out_of_the_allreduce_in_stats_mode(two):
    r = graddiff.check_ranks(_files(two, "noreduce"))
    assert (r.first["step"], r.first["kind"], r.first["name"]) == (0, "grad", "4.bias")
    assert r.diagnosis.cause == "grad_not_allreduced"
    assert "4.bias (Linear) left out of the gradient all-reduce" in r.diagnosis.title
    assert r.first["module_class"] == "Linear" and r.module_classes["1"] == "BatchNorm1d"
    with graddiff.open(r.files[0]) as run:  # judged from fingerprints alone
        assert not run.has_values("grad", "4.bias", 0)


def test_rank_local_batchnorm(two):
    r = graddiff.check_ranks(_files(two, "localbn"))
    assert (r.first["step"], r.first["kind"], r.first["name"]) == (
        1,
        "buffer_start",
        "1.running_mean",
    )
    assert r.diagnosis.cause == "rank_local_batchnorm"
    assert "SyncBatchNorm" in r.diagnosis.fix


def test_skipped_optimizer_step(two):
    r = graddiff.check_ranks(_files(two, "skip"))
    assert r.exit_code == 1
    assert r.diagnosis.cause == "skipped_step"
    assert r.diagnosis.title.startswith("rank 1 skipped optimizer.step() at step 1")
    assert r.steps["per_rank"] == [4, 3]


def test_missing_rank_template_wrote_one_file_per_rank(two):
    names = sorted(os.listdir(os.path.join(two, "norank")))
    assert names == ["plain_rank0.h5", "plain_rank1.h5"]
    assert graddiff.check_ranks(_files(two, "norank", "plain_rank*.h5")).consistent


def test_killed_rank_is_read_up_to_its_last_complete_step(two):
    r = graddiff.check_ranks(_files(two, "killed"))
    with graddiff.open(os.path.join(two, "killed", "run_1.h5")) as run:
        assert run.status == "recording" and list(run.steps) == [0, 1]
        last = 1
    assert r.consistent and r.steps["last"] == last
    assert any("rank 1" in n and f"up to step {last}" in n for n in r.notes)


def test_cli_text_and_json(two):
    code, out = _cli("ranks", os.path.join(two, "localbn", "run_*.h5"))
    assert code == 1
    text = " ".join(out.split())  # the terminal wraps at 80 columns
    assert (
        "INCONSISTENT at step 1: buffer_start 1.running_mean (BatchNorm1d) differs on rank 1"
        in text
    )
    assert "start differ: 1.running_mean, 1.running_var (both BatchNorm1d)" in text
    assert "cause: BatchNorm statistics are rank-local" in out
    code, out = _cli("ranks", "--json", *sorted(_glob(two, "healthy")))
    assert code == 0
    doc = json.loads(out)
    assert doc["verdict"] == "consistent" and doc["world_size"] == 2 and doc["run_id"]


def _glob(root, scenario):
    d = os.path.join(root, scenario)
    return [os.path.join(d, n) for n in os.listdir(d) if n.startswith("run_")]


def test_bad_inputs_are_one_line_exit_2(two, four, tmp_path):
    h2, h4 = os.path.join(two, "healthy"), os.path.join(four, "healthy")
    dup = tmp_path / "copy_of_rank0.h5"
    shutil.copy(os.path.join(h2, "run_0.h5"), dup)
    cases = {
        "files of different runs": [f"{h2}/run_0.h5", os.path.join(two, "sched", "run_1.h5")],
        "different world sizes": [f"{h2}/run_0.h5", f"{h2}/run_1.h5", f"{h4}/run_2.h5"],
        "missing ranks 2, 3 of 4": [f"{h4}/run_0.h5", f"{h4}/run_1.h5"],
        "rank 0 appears twice": [f"{h2}/run_0.h5", str(dup), f"{h2}/run_1.h5"],
        "need the files of at least 2 ranks": [f"{h2}/run_0.h5"],
        "no file matches": [f"{h2}/nothing_*.h5"],
        "single process (world_size 1)": [_single(tmp_path / "a.h5"), _single(tmp_path / "b.h5")],
    }
    for expected, files in cases.items():
        code, out = _cli("ranks", *files)
        assert code == 2, (expected, out)
        lines = out.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and expected in lines[0], out


def _single(path):
    import torch

    model = torch.nn.Linear(2, 1)
    with graddiff.trace(model, path):
        model(torch.ones(1, 2)).sum().backward()
    return str(path)


# -- rank-merged comparison: graddiff compare "run_*.h5" single.h5 ------------------------------


def test_two_ranks_merged_vs_single_process(two):
    """2-rank DDP on slices of the global batch == one process on the whole batch, to rounding."""
    single = os.path.join(two, "plain", "single_rank0.h5")
    r = graddiff.compare(os.path.join(two, "plain", "run_*.h5"), single)
    assert r.exit_code == 0, r.to_dict()
    assert r.max_rel_diff < 1e-5
    assert r.run_a.endswith("(2 ranks merged)")
    assert {"param", "input", "activation", "loss", "grad_output", "grad"} <= set(r.kinds)
    assert any("loss reduction detected as 'mean'" in n for n in r.notes), r.notes
    # the inputs really are the global batch, joined in rank order
    with graddiff.open(single) as s, graddiff.open(os.path.join(two, "plain", "run_1.h5")) as r1:
        assert s.get("input", "0", 2).shape == (8, 6)
        assert (s.get("input", "0", 2)[4:] == r1.get("input", "0", 2)).all()


def test_two_ranks_vs_four_ranks(two, four):
    r = graddiff.compare(
        os.path.join(two, "plain", "run_*.h5"), os.path.join(four, "plain", "run_*.h5")
    )
    assert r.exit_code == 0, r.to_dict()
    assert r.run_b.endswith("(4 ranks merged)")
    assert r.steps["compared"] == 4


def test_wrong_reduction_is_a_divergence_at_the_loss(two):
    single = os.path.join(two, "plain", "single_rank0.h5")
    r = graddiff.compare(os.path.join(two, "plain", "run_*.h5"), single, reduction="sum")
    assert r.exit_code == 1
    assert (r.first.step, r.first.kind) == (0, "loss")


def test_merged_ranks_that_disagree_are_noted(two):
    r = graddiff.compare(
        os.path.join(two, "sched", "run_*.h5"), os.path.join(two, "healthy", "run_*.h5")
    )
    assert any("the ranks disagree on replicated state" in n for n in r.notes), r.notes


def test_cli_sides_from_listed_files(two):
    plain = os.path.join(two, "plain")
    files = [os.path.join(plain, f"run_{r}.h5") for r in range(2)]
    code, out = _cli("compare", *files, os.path.join(plain, "single_rank0.h5"))
    assert code == 0, out
    assert "(2 ranks merged)" in out
    code, out = _cli("compare", *files, os.path.join(two, "healthy", "run_0.h5"), files[0])
    assert code == 2 and out.count("\n") == 1 and "cannot tell the two sides apart" in out, out
    code, out = _cli("compare", "--reduction", "sum", files[0], files[1])
    assert code == 2 and "--reduction applies only" in out, out


# -- FSDP2 (fully_shard, DTensor parameters) and FSDP1 (flat shards) -------------------------


def test_fsdp2_records_every_step_transparently(two):
    d = os.path.join(two, "fsdp2")
    for rank in range(2):
        with open(os.path.join(d, f"transparent_{rank}.txt")) as fh:
            assert fh.read() == "bitwise-equal"  # traced vs untraced: same shards, bit for bit
        with graddiff.open(os.path.join(d, f"run_{rank}.h5")) as run:
            assert run.status == "complete" and list(run.steps) == [0, 1, 2, 3]
            assert run.names("param") == ["0.weight", "0.bias", "2.weight", "2.bias"]
            # each rank records its own shard: rows 8*rank .. 8*rank+7 of the 16 x 6 weight
            assert run.get("param", "0.weight", 0).shape == (8, 6)
            assert run.get("grad", "0.weight", 3).shape == (8, 6)


def test_fsdp2_vs_ddp_and_single_process_by_name(two):
    fsdp = os.path.join(two, "fsdp2", "run_*.h5")
    vs_ddp = graddiff.compare(fsdp, os.path.join(two, "plain", "run_*.h5"))
    assert vs_ddp.exit_code == 0, vs_ddp.to_dict()
    assert any("4 sharded parameter(s) reassembled" in n for n in vs_ddp.notes), vs_ddp.notes
    vs_single = graddiff.compare(fsdp, os.path.join(two, "plain", "single_rank0.h5"))
    assert vs_single.exit_code == 0 and vs_single.max_rel_diff < 1e-5, vs_single.to_dict()


def test_fsdp2_ranks_check_skips_shards(two):
    r = graddiff.check_ranks([os.path.join(two, "fsdp2", "run_*.h5")])
    assert r.exit_code == 0 and r.n_records == 0 and r.compared == []
    assert any("8 sharded record(s)" in n for n in r.notes)


# -- replicated="one": replicated kinds keep values on rank 0 only ------------------------------


def test_replicated_on_one_rank(two):
    d = os.path.join(two, "one")
    with (
        graddiff.open(os.path.join(d, "run_0.h5")) as r0,
        graddiff.open(os.path.join(d, "run_1.h5")) as r1,
    ):
        assert r0.options["replicated"] == "one"
        for step in range(4):
            assert r0.has_values("param", "0.weight", step) and r0.has_values(
                "grad", "0.weight", step
            )
            assert not r1.has_values("param", "0.weight", step)
            assert not r1.has_values("grad", "0.weight", step)
            assert r1.has_values("activation", "0", step)  # each rank's own data keeps values
            # the fingerprints still match: the consistency check needs nothing more
            assert (
                r0.stats("grad", "0.weight", step)["fingerprint"]
                == r1.stats("grad", "0.weight", step)["fingerprint"]
            )
        assert r1.file_size < r0.file_size
    assert graddiff.check_ranks([os.path.join(d, "run_*.h5")]).consistent
    single = os.path.join(two, "plain", "single_rank0.h5")
    assert graddiff.compare(os.path.join(d, "run_*.h5"), single).exit_code == 0


def test_replicated_option_is_checked():
    import torch

    with pytest.raises(graddiff.TraceUsageError, match="replicated='two'"):
        graddiff.trace(torch.nn.Linear(2, 1), "x.h5", replicated="two")


def test_fsdp1_names_shards_and_comparison(two):
    d = os.path.join(two, "fsdp1")
    for rank in range(2):
        with open(os.path.join(d, f"transparent_{rank}.txt")) as fh:
            assert fh.read() == "bitwise-equal"
        with graddiff.open(os.path.join(d, f"run_{rank}.h5")) as run:
            assert list(run.steps) == [0, 1, 2, 3]
            # no _fsdp_wrapped_module. prefixes: the plain model's names
            assert run.names("param") == ["0.weight", "0.bias", "2.weight", "2.bias"]
            assert set(run.names("activation")) == {"0", "1", "2", "(root)"}
            # each original parameter is this rank's 1-D piece of the flat shard
            assert run.get("param", "0.weight", 0).ndim == 1
            assert run.module_classes["0"] == "Linear"  # the wrapped module's, for --map auto
    r = graddiff.compare(os.path.join(d, "run_*.h5"), os.path.join(two, "plain", "run_*.h5"))
    assert r.exit_code == 0, r.to_dict()
    assert any("sharded parameter(s) reassembled" in n for n in r.notes), r.notes
    single = os.path.join(two, "plain", "single_rank0.h5")
    assert graddiff.compare(os.path.join(d, "run_*.h5"), single).exit_code == 0


def test_fsdp1_flat_parameters_by_original_name(two):
    """FSDP1's default (use_orig_params=False): each FlatParameter shard is recorded as one
    piece per original parameter, reassembled by name: FSDP1 vs DDP vs one process agree."""
    d = os.path.join(two, "fsdp1flat")
    for rank in range(2):
        with open(os.path.join(d, f"transparent_{rank}.txt")) as fh:
            assert fh.read() == "bitwise-equal"
        with graddiff.open(os.path.join(d, f"run_{rank}.h5")) as run:
            assert list(run.steps) == [0, 1, 2, 3]
            assert run.names("param") == ["0.weight", "0.bias", "2.weight", "2.bias"]
            assert not any("_flat_param" in n for n in run.names())
            # the unsharded model's parameter count (not this rank's flat shard), as DDP's
            with graddiff.open(os.path.join(two, "plain", "run_0.h5")) as ddp:
                for key in ("n_parameters", "n_trainable_parameters"):
                    assert run.environment[key] == ddp.environment[key] == 163
    # unit 0 holds 0.weight (96 elements) and 0.bias (16): 56 per rank; 0.weight spans both
    with graddiff.open(os.path.join(d, "run_0.h5")) as r0:
        assert r0.get("param", "0.weight", 0).shape == (56,)
        assert r0.get("grad", "0.weight", 0).shape == (56,)
        assert r0.get("param", "0.bias", 0).shape == (0,)  # rank 0 holds none of it
        assert "0.bias" not in r0.names("grad")
    with graddiff.open(os.path.join(d, "run_1.h5")) as r1:
        # traced with replicated="one": the shards are rank 1's own, so they keep their values
        assert r1.options["replicated"] == "one"
        assert r1.get("param", "0.weight", 0).shape == (40,)
        assert r1.get("grad", "0.bias", 0).shape == (16,)
    flat = os.path.join(d, "run_*.h5")
    for other in (
        os.path.join(two, "plain", "run_*.h5"),
        os.path.join(two, "plain", "single_rank0.h5"),
    ):
        r = graddiff.compare(flat, other)
        assert r.exit_code == 0, r.to_dict()
        assert any("4 sharded parameter(s) reassembled" in n for n in r.notes), r.notes
    assert graddiff.compare(flat, os.path.join(two, "fsdp1", "run_*.h5")).exit_code == 0
    # a planted bug in the reference (0.weight[-1, -1], in rank 1's shard, before step 2)
    bug = graddiff.compare(flat, os.path.join(d, "single_bug_rank0.h5"))
    assert bug.exit_code == 1
    first = bug.first
    assert (first["step"], first["kind"], first["name"]) == (2, "param", "0.weight"), first


def test_batchnorm_ddp_vs_single_process_names_per_rank_statistics(two):
    """Plain BatchNorm under DDP normalises each rank's micro-batch with its own statistics: a
    genuinely different computation from one process on the global batch. The report names the
    BatchNorm layer and that reason, with the per-part evidence from the values."""
    d = os.path.join(two, "bnddp")
    r = graddiff.compare(os.path.join(d, "run_*.h5"), os.path.join(d, "single_rank0.h5"))
    assert r.exit_code == 1
    assert (r.first.step, r.first.kind, r.first.name) == (0, "activation", "1")
    cause = r.diagnosis[0]
    assert cause.cause == "rank_local_batchnorm", r.diagnosis
    assert "per rank" in cause.title and "in layer 1 (BatchNorm1d)" in cause.title
    assert "SyncBatchNorm" in cause.fix
    parts = [e for e in cause.evidence if "each rank's part of the output" in e]
    assert parts, cause.evidence
    # the merged side's parts are each normalised alone (rounding), the single process's not
    mine, theirs = (float(t) for t in re.findall(r"(?:deviation|up to) ([0-9.e+-]+)", parts[0]))
    assert mine < 1e-5 < 0.05 < theirs
    # the same layer without data parallelism on either side is not this cause
    r1 = graddiff.compare(os.path.join(d, "run_0.h5"), os.path.join(d, "single_rank0.h5"))
    assert all(c.cause != "rank_local_batchnorm" for c in r1.diagnosis)


@pytest.mark.skipif(
    not __import__("torch").cuda.is_available(),
    reason="SyncBatchNorm runs on CUDA only in torch (aten::batch_norm_stats has no CPU kernel)",
)
def test_syncbatchnorm_ddp_matches_single_process(tmp_path):
    root = launch(tmp_path, 2, ["bnsync"])
    d = os.path.join(root, "bnsync")
    r = graddiff.compare(os.path.join(d, "run_*.h5"), os.path.join(d, "single_rank0.h5"))
    assert r.exit_code == 0, r.to_dict()


def test_two_rank_files_compared_directly_point_at_graddiff_ranks(two):
    d = os.path.join(two, "healthy")
    r = graddiff.compare(os.path.join(d, "run_0.h5"), os.path.join(d, "run_1.h5"))
    assert r.notes[0].startswith("A and B are ranks 0 and 1 of one distributed run")
    other = graddiff.compare(os.path.join(d, "run_0.h5"), os.path.join(two, "sched", "run_1.h5"))
    assert not any("of one distributed run" in n for n in other.notes)
