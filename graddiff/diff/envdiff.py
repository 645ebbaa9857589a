"""The difference between two runs' recorded environments (versions, devices, flags, seeds).

Input: ``run.environment`` of each run (written by graddiff.environment at trace entry).
Output: rows for the report. Keys that can change numerics are marked ``relevant``; keys that
differ between any two processes (command line, host, working directory) are shown but not.
"""

from __future__ import annotations

from typing import Any

#: Keys whose difference can change float results (cited by the rounding diagnosis).
NUMERIC_KEYS = (
    "torch_version",
    "cuda_version",
    "cudnn_version",
    "device",
    "device_name",
    "dtype",
    "cudnn_deterministic",
    "cudnn_benchmark",
    "deterministic_algorithms",
    "tf32_matmul",
    "tf32_cudnn",
    "float32_matmul_precision",
    "fp32_precision",
    "fp32_precision_cudnn",
    "fp32_precision_mkldnn",
    "fp32_precision_cuda_matmul",
    "fp32_precision_cudnn_conv",
    "fp32_precision_cudnn_rnn",
    "fp32_precision_mkldnn_matmul",
    "fp32_precision_mkldnn_conv",
    "fp32_precision_mkldnn_rnn",
    "num_threads",
    "numpy_version",
    "platform",
    "world_size",
)
#: Keys expected to differ between two processes; shown, never evidence.
INCIDENTAL_KEYS = (
    "argv",
    "cwd",
    "hostname",
    "created",
    "graddiff_version",
    "h5py_version",
    "python",
    "rank",
    "local_rank",
    "node",
    "run_id",
)


def environment_diff(env_a: dict[str, Any], env_b: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows ``{"key", "a", "b", "relevant"}`` for every key whose values differ, relevant first."""
    rows = []
    for key in sorted(set(env_a) | set(env_b)):
        va, vb = env_a.get(key), env_b.get(key)
        if va == vb:
            continue
        rows.append({"key": key, "a": va, "b": vb, "relevant": key not in INCIDENTAL_KEYS})
    rows.sort(key=lambda r: (not r["relevant"], r["key"] not in NUMERIC_KEYS, r["key"]))
    return rows


def numeric_differences(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows that can explain rounding-level differences."""
    return [r for r in rows if r["key"] in NUMERIC_KEYS]
