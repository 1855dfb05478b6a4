"""Measure: a block's wall time and how far memory rose above where it started (the merge report's figures)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from lightning_score.utilities.profiling import Measure

MB = 1_000_000
BIG = 200 * MB  # bytes of the allocation the peaks must see
NAP = 0.05


def _ones(nbytes: int, device: str = "cpu") -> torch.Tensor:
    return torch.ones(nbytes // 4, dtype=torch.float32, device=device)  # written, so every page is resident


def test_seconds_cover_the_time_slept() -> None:
    with Measure("cpu") as measure:
        time.sleep(NAP)
    assert NAP <= measure.seconds < NAP + 5.0


def test_a_large_allocation_alive_in_the_block_is_in_the_peak() -> None:
    with Measure(torch.device("cpu")) as measure:
        kept = _ones(BIG)
        time.sleep(NAP)
    assert measure.peak_bytes >= 0.8 * BIG
    assert measure.peak_bytes < 3 * BIG  # the growth, not the process's whole footprint
    del kept


def test_a_large_allocation_freed_inside_the_block_is_caught_by_the_sampler() -> None:
    with Measure("cpu") as measure:
        transient = _ones(BIG)
        time.sleep(0.3)  # the sampler looks every 2 ms; give it time on a loaded machine
        del transient
    assert measure.peak_bytes >= 0.8 * BIG


def test_a_block_that_allocates_nothing_grows_by_about_nothing() -> None:
    big = _ones(BIG)  # memory held before the block is the baseline, not growth
    with Measure("cpu") as measure:
        time.sleep(NAP)
    assert 0 <= measure.peak_bytes < 32 * MB
    del big


def test_the_sampler_thread_stops_and_figures_are_kept_when_the_block_raises() -> None:
    before = threading.active_count()
    with pytest.raises(RuntimeError, match="merge failed"), Measure("cpu") as measure:
        time.sleep(NAP)
        raise RuntimeError("merge failed")  # Measure does not swallow it
    assert measure.seconds >= NAP
    assert threading.active_count() == before


def test_a_fresh_measure_reads_zero() -> None:
    measure = Measure()
    assert measure.device == torch.device("cpu") and measure.seconds == 0.0 and measure.peak_bytes == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_peak_is_the_allocators_exactly() -> None:
    before = _ones(8 * MB, "cuda")  # allocated before: not growth
    with Measure("cuda") as measure:
        transient = _ones(BIG, "cuda")
        del transient  # freed inside the block: the allocator's peak still holds it
        time.sleep(NAP)
    assert BIG <= measure.peak_bytes < BIG + 4 * MB  # the caching allocator rounds up to its block size
    assert measure.seconds >= NAP
    with Measure("cuda") as idle:
        pass
    assert idle.peak_bytes == 0
    del before
