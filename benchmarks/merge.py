"""Benchmark: SCORE through the merge engine against a deliberately plain implementation of the same maths.

Task vectors have the shapes of open_clip's ViT-B-32 image tower (the model is built from its config,
with no download), T experts (default 3). Both implementations run side by side in one process:

* plain: one key and one task at a time, every SVD in full (all singular triplets, as the published
  code does), polar factors by SVD, one projection and one trim per task;
* engine: ``merge_task_vectors(method="score")``: the T tasks of a key batched through one SVD call and
  one GEMM chain.

Printed: wall time of each and the ratio, peak memory of each (CPU: resident set growth; CUDA: allocator
peak), and the relative error ‖engine − plain‖_F / ‖plain‖_F per key (max over keys where T divides r,
and over all keys). SCORE's trim is a hard threshold, so an entry within rounding of it can flip between
kept and dropped; ``--float64`` also runs both in float64, where that cannot happen, to show the engine
is exact, and reports how far the float32 plain result itself is from the float64 one.

Then every method of the registry runs through the engine on the same inputs and one table prints each
one's wall time and peak memory. The data-using methods get synthetic statistics of the real shapes, made
before the clock starts (the pass over images that collects them is the Lightning layer's and is not
timed): RegMean positive-definite Gram matrices for every block linear layer, Fisher merging positive
diagonal Fishers for every key, ESM 1,600 input rows (32 images × 50 tokens) per target layer and task.
The peak memory excludes those statistics, which are resident before the measurement starts.

Usage::

    python benchmarks/merge.py                      # T=3, CPU (or CUDA when present)
    python benchmarks/merge.py --tasks 4 --device cuda --float64
    python benchmarks/merge.py --blocks 2 --no-table   # a quick look
    python benchmarks/merge.py --skip-comparison --methods wudi,cart   # only these rows of the table
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import tempfile
from pathlib import Path
from queue import Empty
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import Tensor

from lightning_score.merging import get_method, is_matrix_key, list_methods, merge_task_vectors, resolve_device
from lightning_score.merging.keys import is_block_linear
from lightning_score.merging.methods.esm import ESM_TARGETS
from lightning_score.task_vector import TaskVector
from lightning_score.utilities.profiling import Measure

# --- inputs -------------------------------------------------------------------------------------------


def first_blocks(shapes: dict[str, tuple[int, ...]], blocks: int | None) -> dict[str, tuple[int, ...]]:
    """The entries outside the transformer blocks and those of its first ``blocks`` blocks (all when None)."""
    if blocks is None:
        return dict(shapes)
    return {
        k: s for k, s in shapes.items() if not k.startswith("transformer.resblocks.") or int(k.split(".")[2]) < blocks
    }


def vit_b32_shapes(blocks: int | None = None) -> dict[str, tuple[int, ...]]:
    """Floating-point entries of open_clip's ViT-B-32 image tower, from its config (no weights downloaded).

    Args:
        blocks: Only the first ``blocks`` transformer blocks (see :func:`first_blocks`); default all.
    """
    import open_clip

    model = open_clip.create_model("ViT-B-32", pretrained=None)
    shapes = {k: tuple(v.shape) for k, v in model.visual.state_dict().items() if v.is_floating_point()}
    return first_blocks(shapes, blocks)


def _low_rank(m: int, n: int, generator: torch.Generator) -> Tensor:
    """A random m×n matrix with a decaying spectrum (σ_i ∝ i^-1/2)."""
    r = min(m, n)
    spectrum = torch.arange(1, r + 1, dtype=torch.float32) ** -0.5
    left = torch.randn(m, r, generator=generator) * spectrum
    return left @ torch.randn(r, n, generator=generator) / r**0.5


def synthetic_task_vectors(
    shapes: dict[str, tuple[int, ...]], num_tasks: int, seed: int = 0
) -> list[dict[str, Tensor]]:
    """Fine-tuning-like updates: decaying spectra, a component shared by all tasks (so they conflict)."""
    generator = torch.Generator().manual_seed(seed)
    tasks: list[dict[str, Tensor]] = [{} for _ in range(num_tasks)]
    for key, shape in shapes.items():
        if len(shape) == 2:
            m, n = shape
            shared = _low_rank(m, n, generator)
            for task in tasks:
                task[key] = 1e-3 * (0.5 * shared + _low_rank(m, n, generator))
        else:
            for task in tasks:
                task[key] = 1e-3 * torch.randn(shape, generator=generator)
    return tasks


def synthetic_statistics(method: str, tvs: list[TaskVector], rows: int = 1600) -> dict[str, Any]:
    """Statistics of the real shapes for a data-using method (seeded), as the option it takes."""
    generator = torch.Generator().manual_seed(1)
    shapes = {key: tuple(tvs[0].tensor_spec(key)[0]) for key in tvs[0]}
    if method == "regmean":  # G = I + Z Zᵀ / 64: positive definite, with off-diagonal structure
        grams = []
        for _ in tvs:
            task = {}
            for key, shape in shapes.items():
                if len(shape) == 2 and is_block_linear(key):
                    z = torch.randn(shape[1], 64, generator=generator)
                    task[key] = torch.eye(shape[1]) + z @ z.T / 64
            grams.append(task)
        return {"grams": grams}
    if method == "fisher":
        return {"fishers": [{k: torch.randn(s, generator=generator).square() for k, s in shapes.items()} for _ in tvs]}
    if method == "esm":
        targets = [k for k, s in shapes.items() if len(s) == 2 and k.endswith(ESM_TARGETS)]
        acts = [{k: torch.randn(rows, shapes[k][1], generator=generator) for k in targets} for _ in tvs]
        return {"activations": acts}
    return {}


# --- the plain implementation ---------------------------------------------------------------------------


def plain_score(task_vectors: list[dict[str, Tensor]], device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
    """SCORE as the published code computes it: per key, per task, every SVD in full."""

    def polar(A: Tensor) -> Tensor:
        P, _, Qh = torch.linalg.svd(A, full_matrices=False)
        return P @ Qh

    merged = {}
    T = len(task_vectors)
    for key in task_vectors[0]:
        deltas = [tv[key].to(device, dtype) for tv in task_vectors]
        if not is_matrix_key(key, tuple(deltas[0].shape)):
            merged[key] = (sum(deltas) / T).cpu()
            continue
        m, n = deltas[0].shape
        r = min(m, n)
        k = r // T
        U_cat = torch.zeros(m, r, device=device, dtype=dtype)
        Vh_cat = torch.zeros(r, n, device=device, dtype=dtype)
        for t, delta in enumerate(deltas):
            U, _, Vh = torch.linalg.svd(delta, full_matrices=False)
            U_cat[:, t * k : (t + 1) * k] = U[:, :k]
            Vh_cat[t * k : (t + 1) * k] = Vh[:k]
        U_perp, Vh_perp = polar(U_cat), polar(Vh_cat)
        sigma = torch.zeros(r, r, device=device, dtype=dtype)
        eye = torch.eye(r, device=device, dtype=torch.bool)
        for delta in deltas:
            C = U_perp.T @ delta @ Vh_perp.T
            off = C.masked_fill(eye, 0.0)
            h = 1.96 * off.std() / T
            keep = ((off - off.mean()).abs() <= h) & ~eye
            sigma += torch.diag(torch.diagonal(C)) + C * keep
        merged[key] = (U_perp @ sigma @ Vh_perp).cpu()
    return merged


# --- measuring ------------------------------------------------------------------------------------------


def _run_job(job: dict[str, Any], queue: Any) -> None:
    """In a fresh process: load the task vectors lazily, merge, save the result, report time and peak memory."""
    torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    dtype = getattr(torch, job["dtype"])
    tvs = [TaskVector.load(path) for path in job["inputs"]]
    if job["method"] == "plain":
        run = lambda: plain_score(tvs, device, dtype)  # noqa: E731
    else:
        options = synthetic_statistics(job["method"], tvs) if get_method(job["method"]).needs_data else {}
        run = lambda: dict(merge_task_vectors(tvs, job["method"], device=device, compute_dtype=dtype, **options))  # noqa: E731
    run_key = next(k for k in tvs[0] if k == "proj")  # warm-up: library loading and kernel caches, one small key
    merge_task_vectors([{run_key: tv[run_key]} for tv in tvs], "score", device=device)
    with Measure(device) as measure:
        result = run()
    if job["output"]:
        TaskVector(result).save(job["output"])
    queue.put((measure.seconds, measure.peak_bytes))


def timed(inputs: list[Path], method: str, dtype: str, device: torch.device, output: Path | None) -> tuple[float, int]:
    """Run one merge in a fresh process (so that memory freed by earlier runs does not hide its peak)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    job = {"inputs": [str(p) for p in inputs], "method": method, "dtype": dtype, "device": str(device),
           "output": str(output) if output else None, "threads": torch.get_num_threads()}  # fmt: skip
    process = context.Process(target=_run_job, args=(job, queue))
    process.start()
    while True:  # a child that dies (out of memory, say) must not leave us waiting forever
        try:
            seconds, peak = queue.get(timeout=5)
            break
        except Empty:
            if not process.is_alive():
                raise RuntimeError(f"the {method} merge died in its process (exit code {process.exitcode})") from None
    process.join()
    if process.exitcode:
        raise RuntimeError(f"the {method} merge failed in its process (exit code {process.exitcode})")
    return seconds, peak


def relative_errors(a: dict[str, Tensor], b: dict[str, Tensor], num_tasks: int) -> tuple[float, float, int]:
    """Max ‖a − b‖/‖b‖ over matrix keys where T divides r, over all keys, and how many keys differ at all."""
    divisible, every, differing = 0.0, 0.0, 0
    for key in b:
        error = ((a[key].double() - b[key].double()).norm() / b[key].double().norm().clamp_min(1e-30)).item()
        every = max(every, error)
        differing += int(error > 0)
        shape = tuple(b[key].shape)
        if len(shape) != 2 or min(shape) % num_tasks == 0:
            divisible = max(divisible, error)
    return divisible, every, differing


def compare_with_plain(
    inputs: list[Path], work: Path, args: argparse.Namespace, device: torch.device, params: int
) -> None:
    """SCORE through the engine against the plain implementation: time, memory and agreement."""
    t_plain, m_plain = timed(inputs, "plain", "float32", device, work / "plain32.safetensors")
    t_engine, m_engine = timed(inputs, "score", "float32", device, work / "engine32.safetensors")
    plain32, engine32 = (
        TaskVector.load(work / "plain32.safetensors"),
        TaskVector.load(work / "engine32.safetensors"),
    )
    err_div, err_all, _ = relative_errors(engine32, plain32, args.tasks)
    print()
    print(f"{'':10}{'wall time':>12}{'peak memory':>14}")
    print(f"{'plain':10}{t_plain:>10.2f} s{m_plain / 2**20:>10.0f} MiB")
    print(f"{'engine':10}{t_engine:>10.2f} s{m_engine / 2**20:>10.0f} MiB")
    print(f"speed-up (plain / engine): {t_plain / t_engine:.2f}x")
    print(f"float32 relative error engine vs plain: max {err_div:.2e} (keys with T | r), {err_all:.2e} (all keys)")
    print(f"(peak memory counts the merged update itself: {params * 4 / 2**20:.0f} MiB in float32)")
    if args.float64:  # float64 inputs, so that both results stay in float64
        inputs64 = []
        for t, path in enumerate(inputs):
            tv = TaskVector.load(path)
            inputs64.append(TaskVector({k: tv[k].double() for k in tv}).save(work / f"task{t}-64.safetensors"))
        t_plain64, _ = timed(inputs64, "plain", "float64", device, work / "plain64.safetensors")
        t_engine64, _ = timed(inputs64, "score", "float64", device, work / "engine64.safetensors")
        plain64, engine64 = (
            TaskVector.load(work / "plain64.safetensors"),
            TaskVector.load(work / "engine64.safetensors"),
        )
        exact_div, exact_all, _ = relative_errors(engine64, plain64, args.tasks)
        noise_div, _, _ = relative_errors(plain32, plain64, args.tasks)
        engine_noise, _, _ = relative_errors(engine32, plain64, args.tasks)
        print(f"float64 wall time: plain {t_plain64:.2f} s, engine {t_engine64:.2f} s ({t_plain64 / t_engine64:.2f}x)")
        print(f"float64 relative error engine vs plain: max {exact_div:.2e} (T | r), {exact_all:.2e} (all keys)")
        print(f"float32 plain vs float64 plain (the float32 result's own error): max {noise_div:.2e} (T | r)")
        print(f"float32 engine vs float64 plain: max {engine_noise:.2e} (T | r)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=3, help="number of task vectors T (default 3)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--blocks", type=int, default=None, help="only the first N transformer blocks")
    parser.add_argument("--float64", action="store_true", help="also compare both implementations in float64")
    parser.add_argument("--no-table", action="store_true", help="skip the table of every method")
    parser.add_argument("--skip-comparison", action="store_true", help="skip SCORE engine vs plain, only the table")
    parser.add_argument("--methods", default=None, help="comma-separated methods for the table (default: all)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = resolve_device(args.device)
    shapes = vit_b32_shapes(args.blocks)
    tvs = synthetic_task_vectors(shapes, args.tasks)
    matrices = sum(is_matrix_key(k, s) for k, s in shapes.items())
    params = sum(torch.Size(s).numel() for s in shapes.values())
    print(f"ViT-B/32 image tower: {len(shapes)} keys ({matrices} matrices), {params / 1e6:.1f} M parameters")
    print(f"T = {args.tasks}, device = {device}, torch threads = {torch.get_num_threads()}")
    print("each merge runs in a fresh process over task vectors loaded lazily from disk")
    with tempfile.TemporaryDirectory(prefix="lightning-score-bench-") as folder:
        work = Path(folder)
        inputs = [TaskVector(tv).save(work / f"task{t}.safetensors") for t, tv in enumerate(tvs)]
        del tvs
        if not args.skip_comparison:
            compare_with_plain(inputs, work, args, device, params)
        if not args.no_table:
            methods = args.methods.split(",") if args.methods else list_methods()
            print()
            print(f"Methods through the engine (T = {args.tasks}, float32, {device}, lazy inputs)")
            print("(* a data-using method, given synthetic statistics of the real shapes)")
            print(f"| {'method':16} | {'wall time (s)':>13} | {'peak memory (MiB)':>17} |")
            print(f"|{'-' * 18}|{'-' * 15}:|{'-' * 19}:|")
            for method in methods:
                seconds, peak = timed(inputs, method, "float32", device, None)
                name = method + (" *" if get_method(method).needs_data else "")
                print(f"| {name:16} | {seconds:13.2f} | {peak / 2**20:17.0f} |", flush=True)


if __name__ == "__main__":
    main()
