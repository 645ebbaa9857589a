"""What the run ran on: versions, devices, determinism flags, seed, command line, model size.

Collected once at trace entry and stored as JSON in the file; the differ prints the difference
between two runs' environments next to rounding-level divergences.

Float32 matmul/convolution precision is read through both of torch's APIs: the legacy flags
(``tf32_matmul``, ``tf32_cudnn``: ``allow_tf32``) and, on torch >= 2.9, the per-backend
``fp32_precision`` settings (``fp32_precision_<backend>_<op>``: "ieee", "tf32", "bf16" or
"none") and ``torch.get_float32_matmul_precision()`` (``float32_matmul_precision``). torch
raises when a legacy flag is read after the new API set it (and the reverse): such a value is
recorded as None, never an error at trace entry.
"""

from __future__ import annotations

import os
import platform
import socket
import sys
import warnings
from typing import Any, Callable

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
        "tf32_matmul": _read(lambda: bool(torch.backends.cuda.matmul.allow_tf32)),
        "tf32_cudnn": _read(lambda: bool(cudnn.allow_tf32)),
        "float32_matmul_precision": _read(lambda: str(torch.get_float32_matmul_precision())),
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
    env.update(fp32_precision(torch))
    if first is not None and first.device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(first.device)
    launch = current_launch()  # torch.distributed when initialised, else torchrun's variables
    env["rank"], env["world_size"] = launch.rank, launch.world_size
    env["local_rank"], env["node"] = launch.local_rank, launch.node
    dist = getattr(torch, "distributed", None)
    if dist is not None and dist.is_available() and dist.is_initialized():
        env["dist_backend"] = str(dist.get_backend())
    return env


#: The per-backend float32 precision settings of torch >= 2.9: (key suffix, attribute path).
FP32_PRECISION = (
    ("", ()),  # torch.backends.fp32_precision: the default every backend inherits
    ("cudnn", ("cudnn",)),
    ("mkldnn", ("mkldnn",)),
    ("cuda_matmul", ("cuda", "matmul")),
    ("cudnn_conv", ("cudnn", "conv")),
    ("cudnn_rnn", ("cudnn", "rnn")),
    ("mkldnn_matmul", ("mkldnn", "matmul")),
    ("mkldnn_conv", ("mkldnn", "conv")),
    ("mkldnn_rnn", ("mkldnn", "rnn")),
)


def fp32_precision(torch: Any) -> dict[str, Any]:
    """``fp32_precision`` (the generic default), ``fp32_precision_<backend>`` and
    ``fp32_precision_<backend>_<op>`` -> the setting (``"ieee"``, ``"tf32"``, ``"bf16"``, or
    ``"none"``: inherit from the level above), where torch has the API (>= 2.9); {} before."""
    out: dict[str, Any] = {}
    for key, path in FP32_PRECISION:
        obj: Any = torch.backends
        for part in path:
            obj = getattr(obj, part, None)
        if obj is not None and hasattr(obj, "fp32_precision"):
            name = f"fp32_precision_{key}" if key else "fp32_precision"
            out[name] = _read(lambda o=obj: str(o.fp32_precision))
    return out


def _read(get: Callable[[], Any]) -> Any:
    """A setting's value, or None where torch refuses to give it (it raises when the legacy
    and the new precision APIs were mixed) or warns: recording never fails nor warns."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return get()
    except (RuntimeError, AttributeError, ValueError):
        return None


def _version_of(module: str) -> Any:
    mod = sys.modules.get(module)
    return getattr(mod, "__version__", None)
