import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mimkit.masking import (BLOCK_GENERATORS, beit_block_mask, block_mask, hybrid_mask, mask_to_ids, num_visible,
                            random_mask)  # fmt: skip


def test_random_mask_keeps_exact_count_per_image():
    m = random_mask(16, 196, 0.75, generator=torch.Generator().manual_seed(0))
    assert m.ids_keep.shape == (16, 49)
    assert torch.equal(m.mask.sum(1), torch.full((16,), 147.0))
    # kept ids are exactly the zeros of the mask, and ids_restore inverts the shuffle
    for b in range(16):
        assert set(m.ids_keep[b].tolist()) == set((m.mask[b] == 0).nonzero().squeeze(1).tolist())
    shuffle = torch.argsort(m.ids_restore, dim=1)
    assert torch.equal(torch.gather(shuffle, 1, m.ids_restore), torch.arange(196).expand(16, -1))


def test_random_mask_is_a_pure_function_of_noise_or_generator():
    noise = torch.rand(4, 64)
    a, b = random_mask(4, 64, 0.75, noise=noise), random_mask(4, 64, 0.75, noise=noise.clone())
    assert torch.equal(a.mask, b.mask) and torch.equal(a.ids_keep, b.ids_keep)
    # lowest noise is kept first (the MAE / HF ViTMAE convention)
    assert torch.equal(a.ids_keep, torch.argsort(noise, dim=1)[:, :16])
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(random_mask(4, 64, 0.5, generator=g1).mask, random_mask(4, 64, 0.5, generator=g2).mask)


def test_odd_token_count_truncates_like_mae():
    assert num_visible(197, 0.75) == int(197 * 0.25) == 49
    assert random_mask(2, 197, 0.75).ids_keep.shape == (2, 49)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_mask_ratio_outside_open_interval_is_rejected(ratio):
    with pytest.raises(ValueError, match="mask_ratio"):
        random_mask(2, 16, ratio)


def test_noise_shape_is_checked():
    with pytest.raises(ValueError, match="noise must have shape"):
        random_mask(2, 16, 0.75, noise=torch.rand(2, 15))


@pytest.mark.parametrize("grid,count", [((14, 14), 75), ((14, 14), 147), ((8, 8), 48), ((8, 8), 26)])
def test_block_mask_exact_count(grid, count):
    for seed in range(5):
        m = block_mask(grid, count, generator=torch.Generator().manual_seed(seed))
        assert m.shape == grid and m.dtype == torch.bool
        assert int(m.sum()) == count


def test_block_mask_is_blocky_and_deterministic():
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    a, b = block_mask((14, 14), 75, generator=g()), block_mask((14, 14), 75, generator=g())
    assert torch.equal(a, b)
    # blocks: most masked cells have a masked 4-neighbour (a random mask at 40% would give ~64%)
    padded = torch.nn.functional.pad(a.float()[None, None], (1, 1, 1, 1))[0, 0]
    neighbours = padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]
    frac = float(((neighbours > 0) & a).sum() / a.sum())
    assert frac > 0.9


def test_mask_to_ids_round_trip():
    m = random_mask(3, 16, 0.75, generator=torch.Generator().manual_seed(1))
    ids = mask_to_ids(m.mask)
    assert torch.equal(ids.mask, m.mask)
    assert torch.equal(ids.ids_keep.sort(1).values, m.ids_keep.sort(1).values)
    with pytest.raises(ValueError, match="same number of visible"):
        mask_to_ids(torch.tensor([[1.0, 0, 0, 0], [1, 1, 0, 0]]))


# ---------------------------------------------------------------- BEiT's own block generator (issue 16, item 1)

# the official generator's figures (issue 16) and the statistics: benchmarks/mask_stats.py, which prints them at scale
_spec = importlib.util.spec_from_file_location("mask_stats", Path(__file__).parents[1] / "benchmarks" / "mask_stats.py")
mask_stats = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mask_stats)
OFFICIAL, OFFICIAL_MASKS = mask_stats.OFFICIAL, mask_stats.OFFICIAL_MASKS
block_mask_statistics = mask_stats.block_mask_statistics


def official_statistics_match(masks: np.ndarray, sigmas: float = 4.0) -> dict[str, bool]:
    """Each statistic within `sigmas` standard errors of the published value: our sample's error and the
    reference's (2,000 masks from the same distribution, so the same per-mask spread), plus its rounding."""
    n, result = len(masks), {}
    for name, (estimate, sd) in block_mask_statistics(masks).items():
        reference, rounding = OFFICIAL[name]
        se = sd * math.sqrt(1 / n + 1 / OFFICIAL_MASKS)
        result[name] = abs(estimate - reference) <= sigmas * se + rounding
    return result


def test_beit_block_generator_reproduces_the_official_distribution():
    masks = np.stack([beit_block_mask((14, 14), 75, generator=torch.Generator().manual_seed(s)).numpy()
                      for s in range(OFFICIAL_MASKS)])  # fmt: skip
    assert masks.reshape(len(masks), -1).sum(1).max() <= 75  # never over the target, sometimes under
    assert official_statistics_match(masks) == dict.fromkeys(OFFICIAL, True), block_mask_statistics(masks)
    # the exact-count variant (the old default: 75.0, 0% short, 2.13 components of ~35 cells) fails every statistic
    exact = np.stack([block_mask((14, 14), 75, generator=torch.Generator().manual_seed(s)).numpy()
                      for s in range(OFFICIAL_MASKS)])  # fmt: skip
    assert official_statistics_match(exact) == dict.fromkeys(OFFICIAL, False), block_mask_statistics(exact)


def test_beit_block_generator_is_a_pure_function_of_the_generator():
    g = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
    for seed in range(20):
        a, b = beit_block_mask((14, 14), 75, generator=g(seed)), beit_block_mask((14, 14), 75, generator=g(seed))
        assert torch.equal(a, b) and a.dtype == torch.bool and a.shape == (14, 14)
    assert not torch.equal(beit_block_mask((14, 14), 75, generator=g(0)), beit_block_mask((14, 14), 75, generator=g(1)))
    # the generator's state moves on, so the next mask drawn from it differs
    gen = g(5)
    assert not torch.equal(beit_block_mask((14, 14), 75, generator=gen), beit_block_mask((14, 14), 75, generator=gen))


def test_hybrid_mask_total_is_exact_with_either_block_generator():
    for kind in BLOCK_GENERATORS:
        for seed in range(30):
            m = hybrid_mask((14, 14), 147, 120, max_block=60, generator=torch.Generator().manual_seed(seed),
                            block_generator=kind)  # fmt: skip
            assert int(m.sum()) == 147, (kind, seed)
