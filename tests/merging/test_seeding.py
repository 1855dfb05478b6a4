"""seeding: one generator per (seed, key), so draws depend on neither key order nor what else was drawn."""

from __future__ import annotations

import pytest
import torch

from lightning_score.merging.seeding import check_seed, key_generator, key_seed, uniform_choices, uniform_draws


def test_a_key_seed_is_stable_63_bit_and_differs_by_seed_and_key() -> None:
    seeds = {key_seed(seed, key) for seed in (0, 1, 2) for key in ("proj", "positional_embedding", "w")}
    assert len(seeds) == 9 and all(0 <= value < 2**63 for value in seeds)
    assert key_seed(0, "proj") == key_seed(0, "proj")
    assert key_seed(1, "2") != key_seed(12, "")  # the separator keeps seed and key apart


def test_draws_do_not_depend_on_other_draws_or_their_order() -> None:
    first = uniform_draws(5, "a", (3, 4))
    torch.rand(100)  # the global stream moves: nothing of it is used
    uniform_draws(5, "b", (10,))
    again = uniform_draws(5, "a", (3, 4))
    assert torch.equal(first, again) and first.dtype == torch.float32
    assert bool(((first >= 0) & (first < 1)).all())
    assert not torch.equal(first, uniform_draws(6, "a", (3, 4)))
    assert torch.equal(torch.rand(3, generator=key_generator(5, "a")), first.flatten()[:3])


def test_choices_are_integers_below_the_count() -> None:
    picks = uniform_choices(3, "w", 4, (1000,))
    assert picks.dtype == torch.int64 and set(picks.tolist()) == {0, 1, 2, 3}
    assert torch.equal(picks, uniform_choices(3, "w", 4, (1000,)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_draws_on_cuda_are_the_cpu_bits() -> None:
    assert torch.equal(uniform_draws(1, "k", (5,), device="cuda").cpu(), uniform_draws(1, "k", (5,)))


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3", None])
def test_a_bad_seed_is_refused_naming_the_method(bad: object) -> None:
    with pytest.raises(ValueError, match=rf"dare_ta: seed must be a non-negative integer, got {bad!r}"):
        check_seed("dare_ta", bad)
    assert check_seed("dare_ta", 0) == 0
