"""Benchmark: the merge phase of a leave-one-domain-out study, with and without reusing factorizations.

Six experts with the shapes of open_clip's ViT-B/32 image tower (built from its config, no download; synthetic
fine-tuning-like updates as in ``benchmarks/merge.py``), saved as task-vector files. For each of the 6 targets,
the other 5 experts are merged with every SVD-based row of the study's default table (SCORE and its three
ablations, TSV-M), each merge loading the files lazily as ``MergeModule`` does:

* **no reuse**: ``merge_task_vectors`` as today: every merge computes every SVD;
* **reuse**: one ``FactorCache(min_tasks=5)`` passed to every merge: each expert's SVDs are computed once, and
  the rows of a target share the shared basis and SCORE's projections;
* **files** (``--files``): a cache with ``save=True`` in one process (writes each expert's factors file), then a
  fresh cache in another process that reads those files (what a later cluster job does).

Each mode runs in its own fresh process. Printed: the merge-phase wall time of each mode and the ratio, each
mode's peak memory (growth of the process's anonymous resident memory; it includes the merged results, one at a
time, and the cache), what the cache held, and the largest absolute difference between any merged tensor of a
mode and the same tensor without reuse (each result is hashed; only a differing hash is compared value by value,
by merging that row again in this process).

Usage::

    python benchmarks/study_merges.py                 # the whole tower: 12 blocks (about 30 min on 2 CPU cores)
    python benchmarks/study_merges.py --blocks 2      # a quick look
    python benchmarks/study_merges.py --files --device cuda
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import multiprocessing
import os
import tempfile
import time
from pathlib import Path
from queue import Empty
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from merge import synthetic_task_vectors, vit_b32_shapes

from lightning_score.merging import FactorCache, merge_task_vectors, resolve_device
from lightning_score.task_vector import TaskVector
from lightning_score.utilities.profiling import Measure

ROWS: list[tuple[str, str, dict[str, Any]]] = [
    ("SCORE", "score", {}),
    ("SCORE (diagonal only)", "score", {"variant": "diagonal"}),
    ("SCORE (off-diagonal only)", "score", {"variant": "off_diagonal"}),
    ("SCORE (full matrix)", "score", {"variant": "full"}),
    ("TSV-M", "tsv", {}),
]


def digest(merged: TaskVector) -> str:
    """A hash of every merged tensor's bytes, in key order."""
    h = hashlib.blake2b(digest_size=16)
    for key in sorted(merged):
        h.update(key.encode())
        h.update(memoryview(merged[key].contiguous().view(torch.uint8).reshape(-1).numpy()))
    return h.hexdigest()


def study(paths: list[Path], device: torch.device, cache: FactorCache | None) -> tuple[dict[str, str], float]:
    """Every row on every target; the digests of the results and the merge-phase seconds."""
    digests, seconds = {}, 0.0
    for target in range(len(paths)):
        sources = [TaskVector.load(p) for i, p in enumerate(paths) if i != target]
        for name, method, options in ROWS:
            started = time.perf_counter()
            merged = merge_task_vectors(sources, method, device=device, factors=cache, **options)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds += time.perf_counter() - started
            digests[f"{target}|{name}"] = digest(merged)
            del merged
    return digests, seconds


def _child(job: dict[str, Any], queue: Any) -> None:
    torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    paths = [Path(p) for p in job["paths"]]
    cache = None
    if job["mode"] != "no reuse":
        cache = FactorCache(save=job["mode"].startswith("files"), min_tasks=len(paths) - 1)
    with Measure(device) as measure:
        digests, seconds = study(paths, device, cache)
    held = cache.nbytes if cache is not None else 0
    stats = dict(cache.stats) if cache is not None else {}
    queue.put({"digests": digests, "seconds": seconds, "peak": measure.peak_bytes, "held": held, "stats": stats})


def run_mode(mode: str, paths: list[Path], device: torch.device) -> dict[str, Any]:
    """One mode in a fresh process (so memory freed by another mode cannot hide this one's peak)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    job = {"mode": mode, "paths": [str(p) for p in paths], "device": str(device), "threads": torch.get_num_threads()}
    process = context.Process(target=_child, args=(job, queue))
    process.start()
    while True:  # a child that dies (out of memory, say) must not leave us waiting forever
        try:
            result = queue.get(timeout=5)
            break
        except Empty:
            if not process.is_alive():
                raise RuntimeError(f"mode '{mode}' died in its process (exit code {process.exitcode})") from None
    process.join()
    return result


def max_difference(paths: list[Path], device: torch.device, differing: list[str]) -> float:
    """Merge the rows whose hashes differ again, with and without reuse, and return the largest difference."""
    worst = 0.0
    for entry in differing:
        target, name = entry.split("|")
        _, method, options = next(row for row in ROWS if row[0] == name)
        sources = [TaskVector.load(p) for i, p in enumerate(paths) if i != int(target)]
        plain = merge_task_vectors(sources, method, device=device, **options)
        reused = merge_task_vectors(sources, method, device=device, factors=FactorCache(), **options)
        worst = max(worst, *((plain[k].double() - reused[k].double()).abs().max().item() for k in plain))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experts", type=int, default=6, help="experts = targets of the leave-one-out (default 6)")
    parser.add_argument("--blocks", type=int, default=None, help="only the first N transformer blocks")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--files", action="store_true", help="also run the factor-file modes (write, then read)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, the cores)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    device = resolve_device(args.device)
    shapes = vit_b32_shapes(args.blocks)
    params = sum(torch.Size(s).numel() for s in shapes.values())
    blocks = len({k.split(".")[2] for k in shapes if k.startswith("transformer.resblocks.")})
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"ViT-B/32 image tower, {blocks} blocks: {len(shapes)} keys, {params / 1e6:.1f} M parameters per expert")
    print(f"{args.experts} experts, leave-one-out over {args.experts} targets ({args.experts - 1} experts per merge)")
    print(f"rows: {', '.join(row[0] for row in ROWS)}")
    print(f"device = {device}, torch threads = {torch.get_num_threads()}, load average at start = {load:.2f}")
    with tempfile.TemporaryDirectory(prefix="lightning-score-study-bench-") as folder:
        work = Path(folder)
        paths = [
            TaskVector(tv, {"name": f"expert{t}"}).save(work / f"expert{t}.safetensors")
            for t, tv in enumerate(synthetic_task_vectors(shapes, args.experts))
        ]
        modes = ["no reuse", "reuse"] + (["files (cold: compute, write)", "files (warm: read)"] if args.files else [])
        results = {mode: run_mode(mode, paths, device) for mode in modes}
        plain = results["no reuse"]
        print()
        print(f"| {'mode':30} | {'merge phase (s)':>15} | {'speed-up':>8} | {'peak memory (MiB)':>17} | max |diff| |")
        print(f"|{'-' * 32}|{'-' * 16}:|{'-' * 9}:|{'-' * 18}:|{'-' * 11}:|")
        for mode, result in results.items():
            differing = [e for e, h in result["digests"].items() if h != plain["digests"][e]]
            difference = max_difference(paths, device, differing) if differing else 0.0
            ratio = plain["seconds"] / result["seconds"]
            print(
                f"| {mode:30} | {result['seconds']:15.1f} | {ratio:7.2f}x | {result['peak'] / 2**20:17.0f} |"
                f" {difference:9.2g} |",
                flush=True,
            )
        print()
        for mode, result in results.items():
            if result["stats"]:
                print(f"{mode}: cache held {result['held'] / 2**20:.0f} MiB at the end; {result['stats']}")
        print(f"(one task vector: {params * 4 / 2**20:.0f} MiB in float32; {len(plain['digests'])} merges per mode)")
        end_load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"load average at the end = {end_load:.2f}")


if __name__ == "__main__":
    main()
