"""Initial noise of each block, a function of (seed, block, shape) only: never of ranks or stages.

Coordinated mode (FreeNoise-style): one pool of Gaussian frames, as many as block 0 has, is drawn
from the seed; block 0 uses it in order and every later block takes B of its frames in an order
given by a permutation seeded from (seed, block), so all blocks share the same noise patterns.
Independent mode draws fresh noise per block, for comparison.
"""

from __future__ import annotations

import torch

from ..config import NOISE_MODES
from .timeline import BlockTimeline


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def _block_seed(seed: int, block: int) -> int:
    return (seed * 1_000_003 + block * 7_919 + 1) % (2**63)


def initial_noise(
    timeline: BlockTimeline, seed: int, frame_shape: tuple[int, int, int], mode: str = "coordinated"
) -> list[torch.Tensor]:
    """Per block, fp32 noise of shape (1, C, frames, H, W); `frame_shape` is (C, H, W)."""
    if mode not in NOISE_MODES:
        raise ValueError(f"noise mode {mode!r}: allowed {NOISE_MODES}")
    channels, height, width = frame_shape
    pool_frames = timeline.block_len(0)
    # Drawn like diffusers' WanPipeline.prepare_latents (one randn from the seeded CPU generator),
    # so a single-block run starts from the same latents as diffusers.
    pool = torch.randn((1, channels, pool_frames, height, width), generator=_generator(seed))
    blocks = [pool]
    for b in range(1, timeline.num_blocks):
        frames = timeline.block_len(b)
        if mode == "coordinated":
            order = torch.randperm(pool_frames, generator=_generator(_block_seed(seed, b)))
            # a pool smaller than a block (ragged tiny videos) repeats its permutation
            index = order.repeat((frames + pool_frames - 1) // pool_frames)[:frames]
            blocks.append(pool[:, :, index].clone())
        else:
            shape = (1, channels, frames, height, width)
            blocks.append(torch.randn(shape, generator=_generator(_block_seed(seed, b))))
    return blocks
