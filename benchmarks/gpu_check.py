"""The GPU checks of ``benchmarks/gpu_check.sh``: merge times CPU vs GPU, CPU–GPU agreement, a short bf16 fit.

``merges``: for ViT-B/32 and ViT-L/14 image-tower shapes (built from open_clip's configs, no download) and
T = 3 and 5 synthetic experts saved as task-vector files (loaded lazily, as a study does), SCORE and TSV-M:

* GPU wall time of one merge as the engine runs it on CUDA (same-shaped keys factorized in one batched solver call,
  the next key prefetched), and SCORE with both turned off, with the largest difference between the two;
* CPU wall time (all cores) of the same merges, measured on the first ``--cpu-blocks`` blocks and the keys
  outside the blocks, scaled to the whole tower (marked "est."; blocks cost alike);
* CPU–GPU agreement of SCORE with ``sign_convention="canonical"``: the largest relative Frobenius difference
  ‖gpu − cpu‖/‖cpu‖ over the keys merged on both (SCORE's CPU time is that canonical merge's).

``svd``: one batch of ViT-L/14 ``mlp.c_fc.weight``-shaped matrices through each CUDA SVD driver (time and
reconstruction error), to see which solver a faster path should use.

``fit``: a few hundred steps of ``CLIPExpert`` (random ViT-B/32 weights, synthetic images, frozen head of random
text weights) under ``precision="bf16-mixed"``; images/s over the steps after warm-up.

Each part stops at its ``--deadline`` (seconds from the start of the process) and says what it skipped.
``--dry-run`` runs everything small on the CPU (one block, a tiny CLIP, a few steps): the script's own check.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from merge import first_blocks, synthetic_task_vectors

from lightning_score.merging import merge_task_vectors
from lightning_score.task_vector import TaskVector
from lightning_score.utilities.profiling import Measure

STARTED = time.perf_counter()
BLOCKS = {"ViT-B-32": 12, "ViT-L-14": 24}
TASKS = (3, 5)


def say(line: str) -> None:
    print(line, flush=True)


def left(deadline: float) -> float:
    return deadline - (time.perf_counter() - STARTED)


def tower_shapes(model_name: str, blocks: int | None) -> dict[str, tuple[int, ...]]:
    """Floating-point entries of an open_clip image tower (first ``blocks`` blocks only, if given)."""
    import open_clip

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = open_clip.create_model(model_name, pretrained=None)
    shapes = {k: tuple(v.shape) for k, v in model.visual.state_dict().items() if v.is_floating_point()}
    return first_blocks(shapes, blocks)


def timed_merge(paths: list[Path], method: str, device: str, keys: list[str] | None = None, **options) -> tuple:
    tvs = [TaskVector.load(p) for p in paths]
    with Measure(device) as measure:
        merged = merge_task_vectors(tvs, method, device=device, keys=keys, **options)
    return merged, measure.seconds, measure.peak_bytes


def relative_difference(a: TaskVector, b: TaskVector) -> float:
    worst = 0.0
    for key in a:
        x, y = a[key].double(), b[key].double()
        worst = max(worst, ((x - y).norm() / y.norm().clamp_min(1e-30)).item())
    return worst


def merges(args: argparse.Namespace) -> None:
    gpu = "cuda" if torch.cuda.is_available() else "cpu"
    if gpu == "cpu":
        say("(no CUDA device: the 'GPU' columns ran on the CPU; this checks the script, not the GPU)")
    models = ["ViT-B-32", "ViT-L-14"] if not args.dry_run else ["ViT-B-32"]
    say(
        f"| {'model':8} | T | {'method':6} | {'GPU (s)':>8} | {'GPU peak (MiB)':>14} | {'GPU unbatched (s)':>17} |"
        f" {'max abs(batched - unbatched)':>28} | {'CPU (s)':>10} | {'CPU/GPU':>7} | {'CPU-GPU rel. diff':>17} |"
    )
    say(f"|{'-' * 10}|---|{'-' * 8}|{'-' * 9}:|{'-' * 15}:|{'-' * 18}:|{'-' * 29}:|{'-' * 11}:|{'-' * 8}:|{'-' * 18}:|")
    for model in models:
        if left(args.deadline) < 0:
            say(f"| {model} | skipped: past the deadline of {args.deadline:.0f} s |")
            continue
        shapes = tower_shapes(model, 1 if args.dry_run else None)
        total_blocks = 1 if args.dry_run else BLOCKS[model]
        cpu_blocks = min(args.cpu_blocks, total_blocks)
        cpu_keys = list(first_blocks(shapes, cpu_blocks))
        scale = total_blocks / cpu_blocks  # blocks cost alike; the keys outside them are small
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as folder:
            experts = synthetic_task_vectors(shapes, max(TASKS))
            paths = [TaskVector(tv).save(Path(folder) / f"e{t}.safetensors") for t, tv in enumerate(experts)]
            del experts
            timed_merge(paths[:2], "score", gpu, keys=["proj"])  # warm-up: solver handles, kernels
            for T in TASKS:
                for method in ("score", "tsv"):
                    if left(args.deadline) < 0:
                        say(f"| {model} | {T} | {method} | skipped: past the deadline of {args.deadline:.0f} s |")
                        continue
                    say(merge_row(model, T, method, paths[:T], gpu, cpu_keys, scale))
    say(
        f"(CPU threads: {torch.get_num_threads()}; CPU times of a tower measured on {args.cpu_blocks} of its blocks "
        "and scaled to all of them where marked est.; SCORE's CPU time is that of its canonical-sign merge)"
    )


def merge_row(model: str, T: int, method: str, paths: list[Path], gpu: str, cpu_keys: list[str], scale: float) -> str:
    """One line of the table: GPU times (batched and not), CPU time, and CPU-GPU agreement (SCORE, canonical)."""
    merged, gpu_s, gpu_peak = timed_merge(paths, method, gpu)
    unbatched, difference, agreement = "-", "-", "-"
    if method == "score":
        plain, plain_s, _ = timed_merge(paths, method, gpu, batch_svd=False, prefetch=False)
        unbatched = f"{plain_s:.2f}"
        difference = f"{max((merged[k] - plain[k]).abs().max().item() for k in merged):.3g}"
        del plain
        on_gpu, _, _ = timed_merge(paths, method, gpu, cpu_keys, sign_convention="canonical")
        on_cpu, cpu_s, _ = timed_merge(paths, method, "cpu", cpu_keys, sign_convention="canonical")
        agreement = f"{relative_difference(on_gpu, on_cpu):.2e}"
    else:
        _, cpu_s, _ = timed_merge(paths, method, "cpu", cpu_keys)
    cpu_text = f"{cpu_s * scale:.1f}" + (" est." if scale != 1 else "")
    return (
        f"| {model} | {T} | {method:6} | {gpu_s:8.2f} | {gpu_peak / 2**20:14.0f} | {unbatched:>17} | {difference:>28} |"
        f" {cpu_text:>10} | {cpu_s * scale / gpu_s:6.1f}x | {agreement:>17} |"
    )


def svd_drivers(args: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        say("svd drivers: no CUDA device, skipped")
        return
    batch = 5 if not args.dry_run else 2
    A = torch.randn(batch, 4096, 1024, device="cuda") @ torch.diag(torch.linspace(1, 1e-3, 1024, device="cuda"))
    for driver in (None, "gesvd", "gesvdj", "gesvda"):
        if left(args.deadline) < 0:
            say(f"svd driver {driver}: skipped (deadline)")
            continue
        try:
            torch.linalg.svd(A[:1], full_matrices=False, driver=driver)
            torch.cuda.synchronize()
            start = time.perf_counter()
            U, S, Vh = torch.linalg.svd(A, full_matrices=False, driver=driver)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            error = ((U * S.unsqueeze(-2)) @ Vh - A).norm() / A.norm()
            say(f"svd driver {driver or 'default'}: {batch} x 4096x1024 in {seconds:.3f} s, rel. error {error:.1e}")
        except RuntimeError as failure:  # a driver this build lacks
            say(f"svd driver {driver}: failed ({str(failure).splitlines()[0]})")


def fit(args: argparse.Namespace) -> None:
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_score.expert import CLIPExpert

    on_gpu = torch.cuda.is_available()
    model, size, batch, steps, warm = ("ViT-B-32", 224, 128, 200, 20)
    if args.dry_run:
        model, size, batch, steps, warm = ("tiny-ViT-W64-L2", 32, 8, 6, 2)
    if left(args.deadline) < 0:
        say("fit: skipped (deadline)")
        return
    classes = 10
    images = torch.randn(8 * batch, 3, size, size)
    labels = torch.randint(0, classes, (8 * batch,))
    data = TensorDataset(images, labels)
    loader = DataLoader(data, batch_size=batch, shuffle=True, pin_memory=on_gpu, drop_last=True)
    expert = CLIPExpert(
        model, pretrained=None, templates="simple", classnames=[f"class {i}" for i in range(classes)],
        head_cache=False, warmup_steps=warm,
    )  # fmt: skip

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            if trainer.global_step == warm:
                if on_gpu:
                    torch.cuda.synchronize()
                self.start = time.perf_counter()

        def on_train_end(self, trainer, module) -> None:
            if on_gpu:
                torch.cuda.synchronize()
            self.seconds = time.perf_counter() - self.start

    clock = Clock()
    trainer = L.Trainer(
        accelerator="gpu" if on_gpu else "cpu", devices=1, precision="bf16-mixed", max_steps=steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[clock],
        gradient_clip_val=1.0,
    )  # fmt: skip
    trainer.fit(expert, train_dataloaders=loader)
    rate = (steps - warm) * batch / clock.seconds
    device = torch.cuda.get_device_name() if on_gpu else "CPU"
    say(f"fit: {model}, bf16-mixed, batch {batch}, {steps - warm} timed steps: {rate:.0f} images/s on {device}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", choices=["merges", "svd", "fit"])
    parser.add_argument("--dry-run", action="store_true", help="small, on whatever device there is")
    parser.add_argument("--cpu-blocks", type=int, default=3, help="blocks of a tower merged on the CPU (default 3)")
    parser.add_argument("--deadline", type=float, default=300.0, help="seconds this part may start work until")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_score"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    {"merges": merges, "svd": svd_drivers, "fit": fit}[args.part](args)


if __name__ == "__main__":
    main()
