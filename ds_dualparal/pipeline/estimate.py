"""Up-front estimate of one generation's work and memory, to say what a job costs and refuse what
cannot fit before any weights load.

Deliberately simple and a lower bound (weights and framework overhead are not counted):
- latents: the first stage keeps every block's latents and initial noise in fp32 (and, for an
  image-to-video model, the job's mask and condition latents: the transformer's extra input channels);
- one block-step's activations: the window's tokens (plus the cached tokens of the next block) times
  the model width, ~16 tensors of that size alive at once, in the run's dtype, twice with CFG;
- the feature cache: the attention input of the next block's context frames, per transformer block
  (keys and values are projected from it when read);
- a clean first frame (Wan2.2-TI2V with an image): block 0's per-token modulation, (tokens, 6, width)
  in the run's dtype and again in fp32 inside each layer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..wan.flops import block_step_flops
from ..wan.model import WanConfig
from .clip import job_timeline
from .image import DEFAULT_SPATIAL_FACTOR

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
LIVE_TENSORS = 16
GiB = 2**30


@dataclass(frozen=True)
class Work:
    latent_frames: int
    blocks: int
    steps: int
    window_tokens: int
    cached_tokens: int
    tflop: float
    first_stage_bytes: int

    @property
    def block_steps(self) -> int:
        return self.blocks * self.steps

    def describe(self) -> str:
        return (f"{self.latent_frames} latent frames in {self.blocks} block(s) x {self.steps} step(s) = "
                f"{self.block_steps} block-steps of {self.window_tokens} tokens (+{self.cached_tokens} cached), "
                f"~{self.tflop:.3g} TFLOP, at least {self.first_stage_bytes / GiB:.3g} GiB on the first stage")


def attention_frames(cfg) -> tuple[int, int]:
    """(window, cached) latent frames a block-step attends over, at most (an over-estimate for several
    blocks). One block holds the whole video (after a clip: with the clip's context) whatever --block-size
    says, with no cache."""
    timeline = job_timeline(cfg)
    if timeline.num_blocks == 1:
        return timeline.block_len(0) + timeline.context_len(0), 0
    return max(timeline.block_len(0), cfg.block_size) + cfg.context, cfg.context


def rotary_problem(cfg, wan: WanConfig, spatial: int = DEFAULT_SPATIAL_FACTOR) -> tuple[tuple[str, ...], str] | None:
    """The fields at fault and why a job's positions do not fit the model's rotary table (Wan's
    `rope_max_seq_len` positions per axis, frames window-relative); None if they fit. diffusers'
    WanRotaryPosEmbed would otherwise fail in the first forward, after the weights load."""
    window, cached = attention_frames(cfg)
    p_t, p_h, p_w = wan.patch_size
    limit = wan.rope_max_seq_len
    frames = (window + cached) // p_t
    if frames > limit:
        return ("num_frames", "block_size", "context"), (
            f"a window of {window} latent frames (+{cached} cached) is {frames} rotary positions, past the "
            f"model's {limit}; use a smaller block_size/context (or fewer frames for one block)")
    for name, pixels, patch in (("height", cfg.height, p_h), ("width", cfg.width, p_w)):
        positions = pixels // spatial // patch
        if positions > limit:
            return (name,), (f"{name} {pixels} is {positions} rotary positions, past the model's {limit}; "
                             f"at most {limit * patch * spatial} pixels")
    return None


def feature_cache_bytes(wan: WanConfig, cached_tokens: int, batch: int, dtype_bytes: int) -> int:
    """Bytes of one block's feature cache over all layers: one attention input per layer, not K and V."""
    return wan.num_layers * batch * cached_tokens * wan.inner_dim * dtype_bytes


def estimate(cfg, wan: WanConfig, spatial: int = DEFAULT_SPATIAL_FACTOR, image_tokens: int = 0,
             clean_first_frame: bool = False) -> Work:
    """`spatial`: the VAE's spatial factor; `image_tokens`: CLIP tokens in every cross-attention;
    `clean_first_frame`: block 0 has per-token timesteps."""
    timeline = job_timeline(cfg)
    _, p_h, p_w = wan.patch_size
    h, w = cfg.height // spatial, cfg.width // spatial
    per_frame = (h // p_h) * (w // p_w)
    window_frames, cached_frames = attention_frames(cfg)
    window = window_frames * per_frame
    cached = cached_frames * per_frame
    batch = 2 if cfg.do_classifier_free_guidance else 1
    dtype = DTYPE_BYTES[cfg.dtype]
    condition = wan.in_channels - wan.out_channels if cfg.image else 0
    latents = (2 * wan.out_channels + condition) * cfg.latent_frames * h * w * 4
    activations = LIVE_TENSORS * batch * (window + cached) * wan.inner_dim * dtype
    cache = feature_cache_bytes(wan, cached, batch, dtype)
    if clean_first_frame:
        activations += batch * timeline.block_len(0) * per_frame * 6 * wan.inner_dim * (dtype + 4)
    flop = timeline.num_blocks * timeline.num_steps * block_step_flops(wan, window, cached, batch, image_tokens)
    return Work(cfg.latent_frames, timeline.num_blocks, timeline.num_steps, window, cached, flop / 1e12,
                latents + activations + cache)


def device_memory(device_type: str) -> int:
    """Bytes of memory of this rank's device: the GPU's, or the host's for a CPU run."""
    if device_type == "cuda":
        import torch

        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def refusal(work: Work, memory: int) -> str | None:
    """Why the job cannot run on a device of `memory` bytes, in one line; None if it may."""
    if work.first_stage_bytes > memory:
        return (f"needs at least {work.first_stage_bytes / GiB:.3g} GiB on the first stage "
                f"(latents, one block's activations and feature cache) but the device has {memory / GiB:.3g} GiB; "
                "use fewer frames, a smaller size or a smaller block")
    return None
