"""What the run ran on: versions, devices, determinism flags, seed, command line, model size.

Collected once at trace entry and stored as JSON in the file; the differ prints the difference
between two runs' environments next to rounding-level divergences.
"""

from __future__ import annotations

import os
import platform
import socket
import sys
from typing import Any

from ._version import __version__
from .launch import current_launch


def collect_environment(model: Any, options: dict[str, Any]) -> dict[str, Any]:
    """A flat, JSON-serialisable description of the recording process."""
    import torch

    params = list(model.parameters())
    first = params[0] if params else None
    cudnn = torch.backends.cudnn
    env: dict[str, Any] = {
        "graddiff_version": __version__,
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "cudnn_version": cudnn.version() if cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(),
        "device": str(first.device) if first is not None else "cpu",
        "device_name": None,
        "dtype": str(first.dtype).replace("torch.", "") if first is not None else None,
        "cudnn_deterministic": bool(cudnn.deterministic),
        "cudnn_benchmark": bool(cudnn.benchmark),
        "deterministic_algorithms": bool(torch.are_deterministic_algorithms_enabled()),
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        "tf32_cudnn": bool(cudnn.allow_tf32),
        "initial_seed": int(torch.initial_seed()),
        "num_threads": int(torch.get_num_threads()),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "argv": list(sys.argv),
        "cwd": os.getcwd(),
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "n_parameters": int(sum(p.numel() for p in params)),
        "n_trainable_parameters": int(sum(p.numel() for p in params if p.requires_grad)),
        "rank": 0,
        "world_size": 1,
        "numpy_version": _version_of("numpy"),
        "h5py_version": _version_of("h5py"),
    }
    if first is not None and first.device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(first.device)
    launch = current_launch()  # torch.distributed when initialised, else torchrun's variables
    env["rank"], env["world_size"] = launch.rank, launch.world_size
    env["local_rank"], env["node"] = launch.local_rank, launch.node
    dist = getattr(torch, "distributed", None)
    if dist is not None and dist.is_available() and dist.is_initialized():
        env["dist_backend"] = str(dist.get_backend())
    return env


def _version_of(module: str) -> Any:
    mod = sys.modules.get(module)
    return getattr(mod, "__version__", None)
