"""Mask generators: pure functions of their inputs (noise tensor or torch.Generator).

Convention everywhere in mimkit: a boolean/float mask has 1 = masked (removed), 0 = visible,
in the original (row-major) patch order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch


class RandomMask(NamedTuple):
    ids_keep: torch.Tensor  # (B, len_keep) indices of visible patches, in shuffled order
    ids_restore: torch.Tensor  # (B, L) inverse permutation, used to un-shuffle decoder tokens
    mask: torch.Tensor  # (B, L) float, 1 = masked, original order


def num_visible(num_patches: int, mask_ratio: float, count: int | None = None) -> int:
    """Visible patches per image: L - `count` when a masked count is given (`mask.count`, which overrides the
    ratio), else truncated as in the MAE reference (int(L * (1 - r)))."""
    if count is not None:
        if not 0 < count < num_patches:
            raise ValueError(f"mask count must be in [1, {num_patches - 1}] of {num_patches} patches, got {count}")
        return num_patches - count
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
    keep = int(num_patches * (1 - mask_ratio))
    if keep < 1:
        raise ValueError(f"mask_ratio {mask_ratio} leaves no visible patch out of {num_patches}")
    return keep


Device = torch.device | str | None


def shuffle_by_noise(batch_size: int, num_patches: int, noise: torch.Tensor | None,
                     generator: torch.Generator | None, device: Device) -> torch.Tensor:  # fmt: skip
    """(B, L) per-image permutations: argsort of `noise` (drawn uniform when None), lowest noise first."""
    if noise is None:
        noise = torch.rand(batch_size, num_patches, generator=generator, device=device)
    elif noise.shape != (batch_size, num_patches):
        raise ValueError(f"noise must have shape {(batch_size, num_patches)}, got {tuple(noise.shape)}")
    return torch.argsort(noise, dim=1)


def random_mask(batch_size: int, num_patches: int, mask_ratio: float, *, count: int | None = None,
                noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                device: Device = None) -> RandomMask:  # fmt: skip
    """Per-sample uniform random masking by argsort of noise; every image keeps exactly
    int(L * (1 - mask_ratio)) patches (L - count with a masked `count`). Lower noise = kept first (same as MAE / HF
    ViTMAE)."""
    len_keep = num_visible(num_patches, mask_ratio, count)
    ids_shuffle = shuffle_by_noise(batch_size, num_patches, noise, generator, device)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    mask = torch.ones(batch_size, num_patches, device=ids_shuffle.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return RandomMask(ids_keep, ids_restore, mask)


def block_limits(grid: tuple[int, int], num_masked: int, max_block: int | None,
                 aspect: tuple[float, float]) -> tuple[int, int, int, float, float]:  # fmt: skip
    """(grid height, grid width, largest block, log of the aspect bounds) of both block generators, the count
    checked."""
    h_grid, w_grid = grid
    if not 0 < num_masked <= h_grid * w_grid:
        raise ValueError(f"num_masked must be in [1, {h_grid * w_grid}], got {num_masked}")
    return h_grid, w_grid, num_masked if max_block is None else max_block, math.log(aspect[0]), math.log(aspect[1])


def _block_rounds(grid: tuple[int, int], num_masked: int, min_block: int, max_block: int | None,
                  aspect: tuple[float, float], generator: torch.Generator | None, tries: int,
                  exact_within: int | None) -> np.ndarray:  # fmt: skip
    """BEiT's blockwise rounds, shared by both generators. Each round has budget = min(remaining, max_block) and
    draws rectangles of area U(min_block, budget) (either order of the bounds, so a budget below min_block draws in
    [budget, min_block]), log-aspect U(log lo, log hi) and a uniform position, `tries` draws per call of the random
    generator (so a mask is a pure function of its state); the first rectangle adding between 1 and `budget` new
    cells is kept. exact_within None (BEiT's generator): a round that keeps none of its `tries` draws ends the mask,
    so the count can fall short. Otherwise (BootMAE's) the round draws again until one fits; `exact_within` draws
    are only a safety cap, after which the round's budget is filled with random free cells (never reached on ViT
    grids)."""
    h_grid, w_grid, max_block, log_lo, log_hi = block_limits(grid, num_masked, max_block, aspect)
    mask = np.zeros((h_grid, w_grid), dtype=bool)
    count = 0
    while count < num_masked:
        budget = min(num_masked - count, max_block)
        added, drawn = 0, 0
        while added == 0 and drawn < (exact_within or tries):
            drawn += tries
            draws = torch.rand(tries, 4, generator=generator, dtype=torch.float64).tolist()
            for u_area, u_aspect, u_top, u_left in draws:
                area = min_block + (budget - min_block) * u_area
                ratio = math.exp(log_lo + (log_hi - log_lo) * u_aspect)
                h, w = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
                if not (0 < h < h_grid and 0 < w < w_grid):
                    continue
                top, left = int(u_top * (h_grid - h + 1)), int(u_left * (w_grid - w + 1))
                window = mask[top : top + h, left : left + w]
                new = h * w - int(window.sum())
                if 0 < new <= budget:
                    window[...] = True
                    added = new
                    break
        if added == 0:
            if exact_within is None:  # BEiT: no rectangle fitted in this round, the official generator stops here
                break
            free = np.flatnonzero(~mask)  # BootMAE's safety cap reached: the budget in random free cells
            mask.flat[free[torch.randperm(free.size, generator=generator)[:budget].numpy()]] = True
            added = budget
        count += added
    return mask


def block_mask(grid: tuple[int, int], num_masked: int, *, min_block: int = 16, max_block: int | None = None,
               aspect: tuple[float, float] = (0.3, 1 / 0.3), generator: torch.Generator | None = None,
               max_attempts: int = 100_000) -> torch.Tensor:  # fmt: skip
    """Exact-count blockwise masking for one image, BootMAE's own generator (`mask.block_generator: exact`): (H, W)
    bool mask with exactly `num_masked` ones. BEiT's rounds (see `_block_rounds`), except that each round draws
    again until a rectangle fits instead of giving up after 10 tries, so the count always reaches the target
    (MAE-style visible-token encoders need the same count in every image; BootMAE's hybrid mask places exactly
    its 120 block patches). Near the target the budget falls below `min_block`, so the last rectangles mostly
    grow the blocks already placed rather than start new ones."""
    return torch.from_numpy(_block_rounds(grid, num_masked, min_block, max_block, aspect, generator, 10, max_attempts))


def beit_block_mask(grid: tuple[int, int], num_masked: int, *, min_block: int = 16, max_block: int | None = None,
                    aspect: tuple[float, float] = (0.3, 1 / 0.3), generator: torch.Generator | None = None,
                    tries: int = 10) -> torch.Tensor:  # fmt: skip
    """BEiT's own blockwise generator for one image: (H, W) bool mask with *at most* `num_masked` ones: a round
    that places no rectangle in `tries` draws ends the mask, so the count can fall short of the target (what the
    official code does; see `block_mask` for the exact-count variant). See `_block_rounds`."""
    return torch.from_numpy(_block_rounds(grid, num_masked, min_block, max_block, aspect, generator, tries, None))


BLOCK_GENERATORS = ("beit", "exact")


def block_mask_for(generator_kind: str, grid: tuple[int, int], num_masked: int, **kwargs) -> torch.Tensor:
    """`mask.block_generator` dispatch: "beit" (BEiT's own, the count may fall short) or "exact" (BootMAE's own, always
    `num_masked`)."""
    if generator_kind not in BLOCK_GENERATORS:
        raise ValueError(f"block generator must be one of {BLOCK_GENERATORS}, got {generator_kind!r}")
    return (beit_block_mask if generator_kind == "beit" else block_mask)(grid, num_masked, **kwargs)


def hybrid_mask(
    grid: tuple[int, int],
    num_masked: int,
    num_block: int,
    *,
    max_block: int | None = None,
    min_block: int = 16,
    max_roll: int = 3,
    generator: torch.Generator | None = None,
    block_generator: str = "exact",
) -> torch.Tensor:
    """BootMAE's hybrid masking for one image: (H, W) bool mask with exactly `num_masked` ones.

    A block mask of `num_block` patches is drawn first (BootMAE's own generator, "exact", places exactly that many;
    BEiT's, "beit", can fall short); the
    visible set is then r random block-masked patches plus (keep - r) random patches outside the blocks,
    r ~ U{0..max_roll}: what BootMAE's "visible-by-block first, block-masked last, roll right by r, keep the first
    `keep`" permutation gives. So about num_block patches are masked in blocks and the rest at random; the total
    is exactly `num_masked` whatever the block count.
    """
    h_grid, w_grid = grid
    keep = h_grid * w_grid - num_masked
    if not 0 < num_block <= num_masked < h_grid * w_grid:
        raise ValueError(f"need 0 < num_block ({num_block}) <= num_masked ({num_masked}) < {h_grid * w_grid}")
    blocks = block_mask_for(block_generator, grid, num_block, min_block=min_block, max_block=max_block,
                            generator=generator).flatten()  # fmt: skip
    inside, outside = blocks.nonzero().squeeze(1), (~blocks).nonzero().squeeze(1)
    roll = min(int(torch.randint(0, max_roll + 1, (), generator=generator)), keep, inside.numel())
    visible = torch.cat([
        inside[torch.randperm(inside.numel(), generator=generator)[:roll]],
        outside[torch.randperm(outside.numel(), generator=generator)[: keep - roll]],
    ])  # fmt: skip
    mask = torch.ones(h_grid * w_grid, dtype=torch.bool)
    mask[visible] = False
    return mask.view(h_grid, w_grid)


def mask_to_ids(mask: torch.Tensor) -> RandomMask:
    """Turn a (B, L) mask with the same number of visible patches per row into gather indices,
    so block masks can drive a visible-tokens-only encoder (MAE-style) too."""
    mask = mask.flatten(1).float()
    visible = (mask == 0).sum(1)
    if not bool((visible == visible[0]).all()):
        raise ValueError("every image needs the same number of visible patches to batch them")
    # Stable sort puts visible (0) patches first, in increasing position.
    ids_shuffle = torch.argsort(mask, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    return RandomMask(ids_shuffle[:, : int(visible[0])], ids_restore, mask)


class ParallelMask(NamedTuple):
    ids_keep: torch.Tensor  # (B, K, L // K) visible patches of each part
    ids_restore: torch.Tensor  # (B, K, L) per-part inverse permutation (visible first)
    mask: torch.Tensor  # (B, K, L) float, 1 = masked in that part


def parts_for_ratio(mask_ratio: float) -> int:
    """EMAE's number of parts K = 1 / (1 - mask_ratio): 4 at 75%. The ratio must give a whole K."""
    parts = round(1.0 / (1.0 - mask_ratio))
    if parts < 2 or abs(1.0 / (1.0 - mask_ratio) - parts) > 1e-6:
        raise ValueError(f"mask_ratio {mask_ratio} must be 1 - 1/K for a whole K >= 2 (0.5, 0.667, 0.75, 0.8, ...)")
    return parts


def parallel_masks(batch_size: int, num_patches: int, parts: int, *, noise: torch.Tensor | None = None,
                   generator: torch.Generator | None = None, device: Device = None) -> ParallelMask:  # fmt: skip
    """EMAE's parallel masks: one random permutation per image (argsort of noise) cut into K contiguous
    chunks; part k sees chunk k only. The visible sets partition the patches, so every patch is visible
    in exactly one part (when K divides L; otherwise the last L mod K patches of the permutation are
    masked in every part)."""
    keep = num_patches // parts
    if keep < 1:
        raise ValueError(f"{parts} parts need at least {parts} patches, got {num_patches}")
    ids_shuffle = shuffle_by_noise(batch_size, num_patches, noise, generator, device)
    # part k: its chunk first, the rest after (rolling keeps a permutation)
    shuffles = torch.stack([torch.roll(ids_shuffle, -k * keep, dims=1) for k in range(parts)], dim=1)
    ids_restore = torch.argsort(shuffles, dim=2)
    mask = torch.ones(batch_size, parts, num_patches, device=ids_shuffle.device)
    mask[:, :, :keep] = 0
    mask = torch.gather(mask, 2, ids_restore)
    return ParallelMask(shuffles[:, :, :keep], ids_restore, mask)


def visible_token_masks(batch_size: int, num_patches: int, mask_ratio: float, parts: int = 1, *,
                        count: int | None = None, noise: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                        device: Device = None) -> RandomMask:  # fmt: skip
    """(ids_keep, ids_restore, mask) for a visible-token encoder from the data pipeline's mask inputs: a given
    `mask` (B, L) (block / hybrid masks), else `noise` of random masks (`count` masked, else `mask_ratio`), or of K
    parallel parts (`parts` > 1: ids_keep (B, K, keep), ids_restore and mask flattened to (B*K, L))."""
    if mask is not None:
        return mask_to_ids(mask)
    if parts > 1:
        ids_keep, ids_restore, masks = parallel_masks(batch_size, num_patches, parts, noise=noise, device=device)
        return RandomMask(ids_keep, ids_restore.flatten(0, 1), masks.flatten(0, 1))
    return random_mask(batch_size, num_patches, mask_ratio, count=count, noise=noise, device=device)


def coarse_random_mask(grid: tuple[int, int], cell: int, mask_ratio: float,
                       generator: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
    """SimMIM's mask for one image: the patch grid is tiled with `cell` x `cell`-patch squares (a 32-px mask patch
    over 16-px tokens: cell 2) and round(ratio * squares) of them, drawn uniformly, are masked. (H, W) bool."""
    h, w = grid
    if h % cell or w % cell:
        raise ValueError(f"mask cells of {cell} patches must tile the {h}x{w} patch grid")
    rows, cols = h // cell, w // cell
    count = int(math.ceil(rows * cols * mask_ratio))
    coarse = torch.zeros(rows * cols, dtype=torch.bool)
    coarse[torch.randperm(rows * cols, generator=generator)[:count]] = True
    return coarse.view(rows, cols).repeat_interleave(cell, 0).repeat_interleave(cell, 1)


class VisibleTokenMasks:
    """Per-sample mask inputs (drawn in the data pipeline from the sample's own generator) for encoders that see
    the visible patches only, so every image keeps the same count: `random` and `parallel` (EMAE's disjoint
    parts, split in the forward pass) give noise (L,); `block` (exact count) and `hybrid` (BootMAE's blocks
    topped up at random to the exact total) give the mask (L,), 1 = masked. `count` (mask.count): the masked
    patches per image, instead of the ratio's."""

    def __init__(self, kind: str, grid: tuple[int, int], mask_ratio: float, *, count: int | None = None,
                 block_generator: str = "exact", hybrid_block_ratio: float = 120 / 196,
                 hybrid_max_block_ratio: float = 60 / 196):  # fmt: skip
        h, w = grid
        self.kind, self.grid, self.block_generator = kind, (h, w), block_generator
        self.num_patches = grid[0] * grid[1]
        self.num_masked = self.num_patches - num_visible(self.num_patches, mask_ratio, count)
        self.num_block = max(1, round(hybrid_block_ratio * self.num_patches))
        self.max_block = max(1, round(hybrid_max_block_ratio * self.num_patches))

    def __call__(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        if self.kind == "hybrid":
            mask = hybrid_mask(self.grid, self.num_masked, min(self.num_block, self.num_masked),
                               max_block=self.max_block, generator=generator, block_generator=self.block_generator)  # fmt: skip
            return {"mask": mask.flatten()}
        if self.kind == "block":  # equal counts only: exact (validation refuses beit here)
            return {"mask": block_mask_for("exact", self.grid, self.num_masked, generator=generator).flatten()}
        return {"noise": torch.rand(self.num_patches, generator=generator)}


def take_patches(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` (B, N) of the per-patch tensor `x` (B, L, ...) (or (1, L, ...), shared by the batch)."""
    ids = ids.view(*ids.shape, *[1] * (x.dim() - 2))
    return torch.gather(x.expand(ids.shape[0], *x.shape[1:]), 1, ids.expand(-1, -1, *x.shape[2:]))


def put_patches(x: torch.Tensor, ids: torch.Tensor, num: int) -> torch.Tensor:
    """The inverse of take_patches: (B, N, ...) rows placed at patches `ids` (B, N) of a (B, num, ...) zero tensor."""
    out = x.new_zeros(x.shape[0], num, *x.shape[2:])
    return out.scatter(1, ids.view(*ids.shape, *[1] * (x.dim() - 2)).expand_as(x), x)


def masked_patch_ids(mask: torch.Tensor, count: int) -> torch.Tensor:
    """(B, count) indices of each image's masked patches (mask (B, L), 1 = masked, `count` per image), ascending."""
    return torch.argsort(mask, dim=1, descending=True, stable=True)[:, :count]


def reconstruction_ids(mask: torch.Tensor, ratio: float | None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """CrossMAE's partial reconstruction: the (B, N) patches to decode, N = round(ratio * masked) masked patches of
    each image, those of lowest `noise` (B, L) (drawn fresh when None). ratio None: every patch, in order."""
    b, num = mask.shape
    if ratio is None:
        return torch.arange(num, device=mask.device).expand(b, -1)
    masked = mask.sum(1)
    if not bool((masked == masked[0]).all()):
        raise ValueError("every image needs the same number of masked patches to batch the decoded ones")
    count = round(ratio * int(masked[0]))
    if not 0 < count <= num:
        raise ValueError(f"reconstruct ratio {ratio} of {int(masked[0])} masked patches decodes {count}")
    if noise is None:
        noise = torch.rand(b, num, device=mask.device)
    return torch.argsort(noise.float().masked_fill(mask == 0, float("inf")), dim=1)[:, :count]


# ---------------------------------------------------------------- I-JEPA's multi-block masks (Assran et al. 2023)


def multiblock_size(grid: tuple[int, int], scale: tuple[float, float], aspect: tuple[float, float],
                    u: float) -> tuple[int, int]:  # fmt: skip
    """The (h, w) of an I-JEPA block from one uniform draw `u`, as the official collator: the same `u` sets the scale
    and the aspect (so larger blocks are also taller); area int(H W scale), h = round(sqrt(area aspect)),
    w = round(sqrt(area / aspect)), each shrunk below the grid's side (a block never spans a whole side)."""
    h_grid, w_grid = grid
    area = int(h_grid * w_grid * (scale[0] + u * (scale[1] - scale[0])))
    ratio = aspect[0] + u * (aspect[1] - aspect[0])
    h, w = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
    return max(1, min(h, h_grid - 1)), max(1, min(w, w_grid - 1))


def multiblock_place(grid: tuple[int, int], size: tuple[int, int], generator: torch.Generator | None, min_keep: int,
                     allowed: Sequence[torch.Tensor] = (),
                     tries: int = 20) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """One block of `size` at a uniform position (top in [0, H - h), left in [0, W - w): the official collator's
    range, which never starts a block on its last possible row / column), cut to the `allowed` (H, W) regions; drawn
    again until it keeps more than `min_keep` patches. After every `tries` failures the last allowed region is
    dropped (the official relaxation), so a context block always ends up valid. Returns (mask, the block uncut)."""
    (h_grid, w_grid), (h, w) = grid, size
    relaxed, failures = 0, 0
    while True:
        top = int(torch.randint(0, h_grid - h, (1,), generator=generator))
        left = int(torch.randint(0, w_grid - w, (1,), generator=generator))
        block = torch.zeros(h_grid, w_grid, dtype=torch.bool)
        block[top : top + h, left : left + w] = True
        mask = block.clone()
        for region in allowed[: max(len(allowed) - relaxed, 0)]:
            mask &= region
        if int(mask.sum()) > min_keep:
            return mask, block
        if not allowed or relaxed >= len(allowed):
            raise ValueError(f"a {h}x{w} block cannot keep more than min_keep={min_keep} patches")
        failures += 1
        if failures % tries == 0:
            relaxed += 1


class MultiBlockMasks:
    """I-JEPA's multi-block masks for one image, from its own generator (`mask_inputs`): `num_targets` target blocks
    of one size (scale `target_scale`, aspect `target_aspect`; they may overlap each other) and one context block
    (scale `context_scale`, square) less every target block (the official allow_overlap=False), each keeping more
    than `min_keep` patches. Returns {"context": (L,) bool, "targets": (num_targets, L) bool}, 1 = in the block: a
    fixed-size form the DataLoader batches. The official collator draws the block sizes once per batch and truncates
    every context to the batch's smallest; here the sizes are drawn per image (a mask depends on its sample only),
    and the method truncates contexts and targets to the batch's smallest counts, keeping the first patches in
    row-major order, as the official truncation does (`multiblock_ids`)."""

    def __init__(self, grid: tuple[int, int], num_targets: int = 4, target_scale=(0.15, 0.2),
                 target_aspect=(0.75, 1.5), context_scale=(0.85, 1.0), min_keep: int = 10):  # fmt: skip
        h, w = grid
        self.grid, self.num_targets, self.min_keep = (h, w), num_targets, min_keep
        self.target_scale, self.target_aspect, self.context_scale = target_scale, target_aspect, context_scale

    def __call__(self, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        u_target, u_context = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        target_size = multiblock_size(self.grid, self.target_scale, self.target_aspect, u_target)
        context_size = multiblock_size(self.grid, self.context_scale, (1.0, 1.0), u_context)
        targets, outside = [], []
        for _ in range(self.num_targets):
            mask, block = multiblock_place(self.grid, target_size, generator, self.min_keep)
            targets.append(mask.flatten())
            outside.append(~block)
        context, _ = multiblock_place(self.grid, context_size, generator, self.min_keep, outside)
        return {"context": context.flatten(), "targets": torch.stack(targets)}


def multiblock_ids(mask: torch.Tensor) -> torch.Tensor:
    """(..., L) bool masks -> (..., n) indices of their first n patches in row-major order, n the smallest count of
    the batch (the official collator's truncation to the batch minimum)."""
    count = int(mask.sum(-1).min())
    return torch.argsort(mask.to(torch.uint8), dim=-1, descending=True, stable=True)[..., :count]


def inverse_block_mask(grid: tuple[int, int], mask_ratio: float, *, mask_length: int = 3, prob_adjust: float = 0.07,
                       count: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
    """data2vec 2.0's inverse block mask for one image: (H, W) bool, 1 = masked, with exactly `num_visible(L, ratio)`
    visible patches (L - `count` with a masked count), so samples batch. The blocks are the *visible* ones: int(L *
    (keep fraction + prob_adjust) / mask_length^2) block centres are drawn uniformly (with replacement), each opens a
    mask_length x mask_length square (clipped at the border: a centre near the edge opens a smaller one); then
    visible patches drawn uniformly are closed (too many) or masked ones opened (too few) until the count is exact;
    everything else is masked. A pure function of the generator's state (fairseq's compute_block_mask_2d with
    inverse_mask and require_same_masks, as read; there the keep fraction is 1 - mask_prob)."""
    h, w = grid
    num = h * w
    keep = num_visible(num, mask_ratio, count)
    kept = torch.zeros(h, w, dtype=torch.bool)
    centres = int(num * ((1.0 - mask_ratio if count is None else keep / num) + prob_adjust) / mask_length**2)
    if centres > 0:
        flat = torch.randint(0, num, (centres,), generator=generator)
        rows, cols, low = flat // w, flat % w, mask_length // 2
        for dy in range(-low, mask_length - low):
            for dx in range(-low, mask_length - low):
                kept[(rows + dy).clamp(0, h - 1), (cols + dx).clamp(0, w - 1)] = True
    kept = kept.flatten()
    have = int(kept.sum())
    if have > keep:  # close visible patches drawn uniformly among the open ones
        kept[torch.multinomial(kept.float(), have - keep, replacement=False, generator=generator)] = False
    elif have < keep:  # open masked ones drawn uniformly
        kept[torch.multinomial((~kept).float(), keep - have, replacement=False, generator=generator)] = True
    return (~kept).view(h, w)
