"""The machine and the software a run computed on: what decides whether another run reproduces its numbers bit for bit.

On one machine with the same versions a study is deterministic. On another CPU, another BLAS/LAPACK or another
thread count the kernels round differently (~1e-6 relative), experts drift by that much over their steps, and a
discrete choice (the α of an α-tuned row) can flip. :func:`describe_environment` records what to compare: the CPU
model, its cores and the threads torch uses, the versions of Python, torch, Lightning and NumPy, and the BLAS and
LAPACK torch was built with (from ``torch.__config__.show()``).
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path
from typing import Any

import torch

__all__ = ["cpu_model", "describe_environment"]


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else ``platform.processor()``; ``"unknown"`` if neither)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _build_setting(config: str, name: str) -> str | None:
    match = re.search(rf"\b{name}=([^,\s]*)", config)
    return match.group(1) if match else None


def describe_environment() -> dict[str, Any]:
    """The machine and software of this process, as JSON-ready values.

    Returns:
        ``cpu``, ``cpu_count`` (logical cores), ``usable_cpus`` (this process's affinity), ``torch_threads``,
        ``torch_interop_threads``, ``thread_variables`` (``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` as set),
        ``cpu_capability`` (the SIMD kernels torch dispatches to), ``blas``, ``lapack``, ``math_libraries`` (the
        BLAS/LAPACK/MKL lines of ``torch.__config__.show()``), ``cuda`` (the device name, or null),
        ``python``, ``platform``, ``torch``, ``lightning``, ``numpy``.

    Example:
        >>> environment = describe_environment()
        >>> environment["torch"] == torch.__version__ and environment["torch_threads"] >= 1
        True
    """
    import lightning
    import numpy

    config = torch.__config__.show()
    libraries = [
        line.strip(" -") for line in config.splitlines() if re.search(r"Math Kernel|LAPACK|BLAS|OpenBLAS", line)
    ]
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        usable = os.cpu_count()
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "thread_variables": {
            name: os.environ[name] for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if name in os.environ
        },
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "blas": _build_setting(config, "BLAS_INFO"),
        "lapack": _build_setting(config, "LAPACK_INFO"),
        "math_libraries": [line for line in libraries if not line.startswith("Build settings")],
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "numpy": numpy.__version__,
    }
