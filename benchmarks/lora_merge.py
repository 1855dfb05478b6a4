"""Benchmark: LoRA experts merged through their factors against the same experts densified, side by side.

T LoRA experts (default 5) with the shapes of open_clip's ViT-B-32 image tower (built from its config, no download),
rank ρ (default 16) on every block linear layer (``attn.in_proj_weight``, ``attn.out_proj.weight``,
``mlp.c_fc.weight``, ``mlp.c_proj.weight``): Δ_t = s·B_t·A_t, with a component shared by all experts so that they
conflict. Their task vectors are saved as files, once with the factors (what ``ScoreMergeCallback`` writes for a
PEFT model) and once dense. Each merge then runs in a fresh process, reading the files lazily:

* ``factors``: ``merge_task_vectors`` through the factors (the default for LoRA task vectors);
* ``dense, same definition``: the same factor files with ``through_factors=False``: the dense matrices, each task
  still keeping k_t = min(k, ρ) singular directions (``docs/methods.md``, "Rank-deficient tasks");
* ``dense experts``: the dense files, merged as full-rank experts (k = ⌊r/T⌋ directions each, the ones beyond ρ
  from the null space the solver picks).

Printed per method: wall time, the ratio to the factor path, the peak resident-memory growth during the merge
(beside one dense expert's size), and the largest per-key relative difference max|a − b| / max|b| to the factor
path. SCORE runs with ``sign_convention="canonical"`` (its trimming statistics depend on the singular vectors'
signs, which the two paths' solvers choose independently).

Run it with ``OMP_NUM_THREADS=1`` on shared cores (threads that wait for each other make small SVDs slow).

Usage::

    python benchmarks/lora_merge.py                  # 12 blocks, T = 5, ρ = 16 (minutes on 2 cores)
    python benchmarks/lora_merge.py --blocks 2       # a quick look
    python benchmarks/lora_merge.py --float64        # both paths in float64
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
from merge import vit_b32_shapes

from lightning_score.merging.keys import is_block_linear
from lightning_score.task_vector import LowRankUpdate, TaskVector
from lightning_score.utilities.profiling import Measure

METHODS = {"score": {"sign_convention": "canonical"}, "tsv": {}}


def lora_experts(shapes: dict[str, tuple[int, ...]], num_tasks: int, rank: int, seed: int = 0) -> list[TaskVector]:
    """T LoRA experts: s·B_t·A_t on every block linear layer, B_t and A_t half shared, half the expert's own."""
    generator = torch.Generator().manual_seed(seed)
    keys = {key: shape for key, shape in shapes.items() if len(shape) == 2 and is_block_linear(key)}
    shared = {
        key: (torch.randn(m, rank, generator=generator), torch.randn(rank, n, generator=generator))
        for key, (m, n) in keys.items()
    }
    experts = []
    for t in range(num_tasks):
        factors = {}
        for key, (m, n) in keys.items():
            B = (shared[key][0] + torch.randn(m, rank, generator=generator)) * 0.01
            A = (shared[key][1] + torch.randn(rank, n, generator=generator)) / n**0.5
            factors[key] = LowRankUpdate(B, A, scale=2.0)  # lora_alpha / r = 2
        experts.append(TaskVector({}, {"name": f"lora{t}", "base_fingerprint": "synthetic"}, factors))
    return experts


def _run(paths: list[str], method: str, through_factors: bool, dtype: str, out: str, queue: Any) -> None:
    """One merge in this (fresh) process: wall time and peak resident-memory growth; the result to ``out``."""
    from lightning_score.merging import merge_task_vectors

    tvs = [TaskVector.load(path) for path in paths]
    compute = torch.float64 if dtype == "float64" else None
    with Measure("cpu") as measure:  # anonymous resident memory: the files are memory-mapped, not counted
        merged = merge_task_vectors(
            tvs, method, device="cpu", through_factors=through_factors, compute_dtype=compute, **METHODS[method]
        )
    merged.save(out)
    queue.put((measure.seconds, measure.peak_bytes))


def _measure(paths: list[Path], method: str, through_factors: bool, dtype: str, out: Path) -> tuple[float, int]:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(
        target=_run, args=([str(p) for p in paths], method, through_factors, dtype, str(out), queue)
    )
    process.start()
    result = queue.get()
    process.join()
    return result


def _difference(a: TaskVector, b: TaskVector) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max() / b[k].double().abs().max()) for k in b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=None, help="only the first N transformer blocks (default all 12)")
    parser.add_argument("--tasks", type=int, default=5)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--methods", default="score,tsv")
    parser.add_argument("--float64", action="store_true", help="compute both paths in float64")
    args = parser.parse_args()
    dtype = "float64" if args.float64 else "float32"
    experts = lora_experts(vit_b32_shapes(args.blocks), args.tasks, args.rank)
    dense_bytes = sum(4 * experts[0].tensor_spec(k)[0][0] * experts[0].tensor_spec(k)[0][1] for k in experts[0])
    factor_bytes = sum(4 * u.rank * sum(u.shape) for u in (experts[0].low_rank(k) for k in experts[0]))
    print(
        f"{args.tasks} LoRA experts, rank {args.rank}, {len(experts[0])} block linear layers ({args.blocks or 12} "
        f"blocks); one dense expert {dense_bytes / 2**20:.1f} MiB, its factors {factor_bytes / 2**20:.1f} MiB; "
        f"{dtype}, {torch.get_num_threads()} threads"
    )
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        factor_paths = [tv.save(root / f"lora{t}.safetensors") for t, tv in enumerate(experts)]
        dense_paths = [
            TaskVector({k: tv[k] for k in tv}, tv.metadata).save(root / f"dense{t}.safetensors")
            for t, tv in enumerate(experts)
        ]
        print(
            "| method | path | seconds | × factor path | peak memory (MiB) | max rel. diff. to factors | to float64 |"
        )
        print("|---|---|---|---|---|---|---|")
        for method in args.methods.split(","):
            runs = {
                "factors": (factor_paths, True),
                "dense, same definition": (factor_paths, False),
                "dense experts": (dense_paths, True),
            }
            results = {}
            for label, (paths, through) in runs.items():
                out = root / f"{method}-{label.replace(' ', '_').replace(',', '')}.safetensors"
                seconds, peak = _measure(paths, method, through, dtype, out)
                results[label] = (seconds, peak, TaskVector.load(out))
            exact = root / f"{method}-float64.safetensors"
            _measure(factor_paths, method, True, "float64", exact)
            reference, exact_tv = results["factors"][2], TaskVector.load(exact)
            for label, (seconds, peak, merged) in results.items():
                ratio = seconds / results["factors"][0]
                difference = 0.0 if label == "factors" else _difference(merged, reference)
                error = _difference(merged, exact_tv)
                print(
                    f"| {method} | {label} | {seconds:.2f} | {ratio:.1f} | {peak / 2**20:.1f} | {difference:.2e} "
                    f"| {error:.2e} |"
                )


if __name__ == "__main__":
    main()
