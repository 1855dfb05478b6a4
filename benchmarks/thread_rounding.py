"""Benchmark: how much a merge's result depends on the CPU thread count it runs with (and what that does to reuse).

Every "bit-identical" claim of lightning-score (with and without a ``FactorCache``, factor files read by a later
job, a merge sharded over DDP ranks against one process's) holds when both sides compute with the same thread
count, BLAS/LAPACK build and CPU: LAPACK's SVDs and BLAS's products split their work by thread count, and on some
CPUs (seen on an AMD EPYC) 1 and 2 threads round differently. This script measures the size of that difference.

Five experts with the shapes of the first ``--blocks`` blocks of open_clip's ViT-B/32 image tower (synthetic
updates as in ``benchmarks/merge.py``, saved as task-vector files). Each run is a fresh process started with the
given thread count (``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` and ``torch.set_num_threads``):

* every data-free method merged with 1 thread and with ``--threads`` threads: the largest absolute difference and
  the largest per-key relative difference ‖a − b‖_F / ‖b‖_F between the two merges;
* factor files written by a ``--threads``-thread job and read by a 1-thread job (a cluster job on another node
  size), against that 1-thread job computing everything itself (SCORE and TSV-M).

Usage::

    python benchmarks/thread_rounding.py              # 1 block, 1 against 2 threads (about a minute on 2 cores)
    python benchmarks/thread_rounding.py --blocks 12 --threads 4
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from merge import synthetic_task_vectors, vit_b32_shapes

from lightning_score.merging import FactorCache, get_method, list_methods, merge_task_vectors
from lightning_score.task_vector import TaskVector

_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _merge_all(paths: list[str], methods: list[str], output: str, factors: str) -> None:
    """Merge the files with every method; ``factors``: ``none``, ``write`` or ``read`` a FactorCache's files."""
    tvs = [TaskVector.load(p) for p in paths]
    results: dict[str, dict[str, torch.Tensor]] = {}
    for method in methods:
        cache = FactorCache(save=True) if factors != "none" else None
        results[method] = dict(merge_task_vectors(tvs, method, device="cpu", factors=cache))
    torch.save(results, output)


def _worker(threads: int, args: tuple[Any, ...]) -> None:
    torch.set_num_threads(threads)
    _merge_all(*args)


def run(threads: int, *args: Any) -> dict[str, dict[str, torch.Tensor]]:
    """``_merge_all(*args)`` in a fresh process with ``threads`` threads; its results."""
    saved = {name: os.environ.get(name) for name in _THREAD_VARIABLES}
    os.environ.update(dict.fromkeys(_THREAD_VARIABLES, str(threads)))
    try:
        process = multiprocessing.get_context("spawn").Process(target=_worker, args=(threads, args))
        process.start()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    process.join()
    if process.exitcode != 0:
        raise SystemExit(f"a merge process failed (exit code {process.exitcode})")
    return torch.load(args[2], weights_only=True)


def difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Largest absolute entry difference, largest per-key relative Frobenius difference."""
    absolute = max(float((a[k].double() - b[k].double()).abs().max()) for k in b)
    relative = max(float((a[k].double() - b[k].double()).norm() / b[k].double().norm().clamp(min=1e-30)) for k in b)
    return absolute, relative


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=1, help="transformer blocks of the tower (default 1)")
    parser.add_argument("--threads", type=int, default=2, help="the thread count compared with 1 (default 2)")
    parser.add_argument("--tasks", type=int, default=5, help="experts per merge (default 5)")
    args = parser.parse_args()
    methods = [m for m in list_methods() if not get_method(m).needs_data]
    with tempfile.TemporaryDirectory() as folder:
        shapes = vit_b32_shapes(args.blocks)
        paths = []
        for index, tensors in enumerate(synthetic_task_vectors(shapes, args.tasks)):
            paths.append(str(TaskVector(tensors, {"name": f"e{index}"}).save(Path(folder) / f"e{index}.safetensors")))
        out = str(Path(folder) / "{}.pt")
        one = run(1, paths, methods, out.format("one"), "none")
        many = run(args.threads, paths, methods, out.format("many"), "none")
        print(f"ViT-B/32 image tower, {args.blocks} block(s); {args.tasks} experts; torch {torch.__version__}, "
              f"{torch.backends.cpu.get_cpu_capability()}; 1 thread against {args.threads}")  # fmt: skip
        print("\n| method | max abs diff | max per-key rel diff |\n|---|---:|---:|")
        for method in methods:
            absolute, relative = difference(many[method], one[method])
            print(f"| {method} | {absolute:.2e} | {relative:.2e} |")
        svd = ["score", "tsv"]
        run(args.threads, paths, svd, out.format("write"), "write")  # the factor files, by a many-thread job
        read = run(1, paths, svd, out.format("read"), "read")  # a 1-thread job reads them
        print(f"\nfactor files written with {args.threads} threads, read with 1, against 1 thread computing them:")
        print("\n| method | max abs diff | max per-key rel diff |\n|---|---:|---:|")
        for method in svd:
            absolute, relative = difference(read[method], one[method])
            print(f"| {method} | {absolute:.2e} | {relative:.2e} |")


if __name__ == "__main__":
    main()
