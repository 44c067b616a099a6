"""Train the tiny Wan text-to-video model on procedural toy videos (ds_dualparal.toy.toyvideo).

    python launch/train_tiny.py --out runs/tiny-wan --device cuda --max-minutes 11.5   # one H200
    python launch/train_tiny.py --out /tmp/tiny-smoke --smoke                         # CPU, seconds

Three stages, all seeded by --seed, write one diffusers WanPipeline folder to --out (what
`WanPipeline.from_pretrained` and `launch/generate.py --model` load) plus `training_log.json`:

1. Text. The tiny UMT5 encoder of `ds_dualparal.toy.tiny` (the random one `write_tiny_wan(seed=S)` writes,
   seed S + 3) encodes every toy prompt (5 colours x 3 shapes x 4 motions x 4 backgrounds = 240) and ""
   as WanPipeline does: 512 tokens, embeddings past the prompt's length zeroed. With --text-lr > 0 it
   trains with the DiT (step 3) and is saved as the folder's text_encoder/; 0 keeps it frozen.
2. VAE. A small `AutoencoderKLWan` (z_dim 16, 8x space, 4x time like Wan 2.1) learns to reconstruct
   freshly rendered clips of --vae-frames frames (L1 + MSE + a small KL term, posterior sampled). With
   --vae-temporal local (the default) its convolutions outside the temporal resampling see the current
   frame only, so it is the same at every depth of a long video (docs/tiny-model.md). Its
   per-channel latent mean and std, measured on the DiT's clip pool, go into the VAE config as
   `latents_mean` / `latents_std`, as WanPipeline and this engine normalise latents.
3. DiT. A small `WanTransformer3DModel` learns Wan's flow matching on the normalised latents of a pool
   of --pool-frames clips, encoded once (posterior mean) and partly refreshed as it trains: sigma drawn
   uniformly and shifted by --flow-shift like Wan's scheduler, x_t = (1 - sigma) x0 + sigma noise,
   timestep = 1000 sigma, target noise - x0 (diffusers' `flow_prediction`). Each step takes random
   temporal crops of one length in [--min-crop, --max-crop] latent frames from anywhere in the clips
   (or, with probability --whole-clip-prob, whole clips: the long context of a whole-sequence run),
   as DualParal runs the DiT on windows from the middle of a video with rotary positions from 0; the
   batch grows for short crops so a step holds about as many tokens. With probability --context-jitter
   a crop's first frames (the window's context, one step cleaner in DualParal) get a lower noise level
   and its last frames a higher one than the timestep says. The prompt is dropped to "" with
   probability --cfg-dropout, for classifier-free guidance. The EMA of the weights is saved.

On CUDA: bf16 autocast, TF32, cudnn autotuning. Each stage runs its step count, cut to what fits its
time budget (--max-minutes-vae / --max-minutes-dit, and --max-minutes for the whole run): after about
a hundred steps the measured rate fixes the count (see `Plan`), and the learning rate follows a warm-up
then a cosine to 10% over it. The training log records the counts and rates; rerunning with those
counts and no time limits repeats the run (up to the GPU's non-deterministic kernels).

The DiT stage can be split over processes (one GPU call lasts at most 10 minutes): it saves its state to
--state when --max-minutes ends it early (and at --pause-at-step, every --save-every-minutes), and
`--resume STATE --out NEW` goes on to the same weights as an uninterrupted run (see `StateWriter`).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ds_dualparal.config import TEXT_TOKENS  # noqa: E402
from ds_dualparal.toy import toyvideo  # noqa: E402  (after the path: the script runs from a checkout)
from ds_dualparal.toy.tiny import (  # noqa: E402
    build_scheduler,
    build_text_encoder,
    build_tokenizer,
    save_pipeline,
)

logger = logging.getLogger("train_tiny")

SPATIAL, TEMPORAL = 8, 4  # Wan 2.1's VAE compression
Z_DIM = 16


@dataclasses.dataclass
class Stage:
    """What a stage did, for the training log."""

    steps: int = 0
    seconds: float = 0.0
    final_loss: float | None = None
    stopped_by: str = "steps"
    extra: dict = dataclasses.field(default_factory=dict)


class Clock:
    """Wall time since the run started, and the time a stage may still take."""

    def __init__(self, max_minutes: float | None):
        self.start = time.perf_counter()
        self.max_seconds = None if max_minutes is None else 60.0 * max_minutes

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def budget(self, stage_minutes: float | None, reserve_s: float = 0.0) -> float:
        """Seconds a stage starting now may run: its own limit, cut to what the run has left."""
        budget = math.inf if stage_minutes is None else 60.0 * stage_minutes
        if self.max_seconds is not None:
            budget = min(budget, max(0.0, self.max_seconds - self.elapsed() - reserve_s))
        return budget


class Plan:
    """How many steps a stage takes: its --*-steps, or fewer when its time budget cannot hold them.

    The rate is measured over steps `skip` .. `skip + over` (past compilation and autotuning); the
    count is then fixed for the rest of the stage, at what fits in `margin` of the remaining budget.
    The learning-rate schedule runs over that count, and the log records it, so rerunning with
    `--*-steps` set to it and no time limit repeats the run. The budget still stops a stage that
    turns out slower than measured. A stage resumed from a saved state (`restore`) keeps the count
    and counts the seconds already spent against its budget; `deadline_s` (this process's time) pauses
    it earlier, to be resumed.
    """

    def __init__(self, steps: int, budget_s: float, *, skip: int = 20, over: int = 100, margin: float = 0.95,
                 deadline_s: float = math.inf):
        self.total = steps
        self.budget_s = budget_s
        self.deadline_s = deadline_s
        self.skip, self.over, self.margin = skip, over, margin
        self.started = time.perf_counter()
        self.already_s = 0.0  # spent by earlier processes (a resumed stage)
        self.mark = None
        self.measured_rate = None

    def restore(self, record: dict, already_s: float) -> None:
        """Continue the plan `record()` saved, after `already_s` seconds of this stage in earlier processes."""
        self.total = record["planned_steps"]
        self.measured_rate = record["measured_steps_per_s"]
        self.already_s = already_s

    def session_elapsed(self) -> float:
        return time.perf_counter() - self.started

    def elapsed(self) -> float:
        return self.already_s + self.session_elapsed()

    def update(self, step: int) -> None:
        """Call before step `step` (0-based) runs."""
        if not math.isfinite(self.budget_s) or self.measured_rate is not None:
            return
        if step == self.skip:
            self.mark = self.elapsed()
        elif step == self.skip + self.over and self.mark is not None:
            now = self.elapsed()
            self.measured_rate = self.over / max(now - self.mark, 1e-9)
            fits = step + int(self.margin * self.measured_rate * max(0.0, self.budget_s - now))
            if fits < self.total:
                logger.info("%.2f steps/s measured: %d steps fit in the time budget (%.0f s)", self.measured_rate,
                            fits, self.budget_s)
                self.total = max(step, fits)

    def stop(self, step: int) -> str | None:
        """Before step `step` (0-based): None to run it, else why the stage ends there: "planned" (the
        count fitted to the budget is reached), "time" (the budget ran out first) or "paused" (this
        process's deadline came first: the stage can be resumed)."""
        self.update(step)
        if step >= self.total:
            return "planned"
        if self.out_of_time():
            return "time"
        return "paused" if self.session_elapsed() >= self.deadline_s else None

    def out_of_time(self) -> bool:
        return self.elapsed() >= self.budget_s

    def progress(self, step: int) -> float:
        return step / max(1, self.total)

    def record(self) -> dict:
        return {"planned_steps": self.total, "measured_steps_per_s": self.measured_rate, "budget_s": self.budget_s}


def lr_factor(step: int, progress: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up over `warmup` steps, then a cosine from 1 to `floor` as progress goes 0 -> 1."""
    warm = min(1.0, (step + 1) / max(1, warmup))
    progress = min(max(progress, 0.0), 1.0)
    return warm * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def set_lr(optimizer, factor: float) -> None:
    """Every parameter group's learning rate: its `initial_lr` times `factor`."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------- text


class PromptTokens:
    """The token ids and attention mask of every toy prompt and "" (padded to the longest), on the device."""

    def __init__(self, prompts: list[str], tokenizer, device):
        inputs = tokenizer(prompts, padding="longest", truncation=True, max_length=TEXT_TOKENS,
                           add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        self.ids, self.mask = inputs.input_ids.to(device), inputs.attention_mask.to(device)


def embed_prompts(text_encoder, tokens: PromptTokens, index: torch.Tensor) -> torch.Tensor:
    """(len(index), TEXT_TOKENS, d_model) fp32 embeddings of prompts `index`, as WanPipeline's `encode_prompt`
    makes them (gradients kept when the encoder trains).

    WanPipeline pads to TEXT_TOKENS and then zeroes every embedding past the prompt's length; as the
    padding is masked out of the encoder's attention, padding only to the longest prompt and zeroing the
    rest gives the same embeddings at a fraction of the cost (`check_prompt_embeddings`). The DiT sees
    all TEXT_TOKENS of them: its text projection turns the zeros into tokens its cross-attention reads.
    """
    ids, mask = tokens.ids[index], tokens.mask[index]
    hidden = text_encoder(ids, mask).last_hidden_state.float() * mask[..., None]
    return F.pad(hidden, (0, 0, 0, TEXT_TOKENS - hidden.shape[1]))


@torch.no_grad()
def check_prompt_embeddings(prompts: list[str], text_encoder, tokenizer, tokens: PromptTokens, device) -> float:
    """Largest difference between `embed_prompts` and WanPipeline's own `encode_prompt` on a few prompts;
    raises when they differ by more than rounding."""
    from diffusers import WanPipeline

    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=None, scheduler=None)
    probe = [0, len(prompts) // 2, len(prompts) - 1]
    reference, _ = pipe.encode_prompt(
        prompt=[prompts[i] for i in probe], do_classifier_free_guidance=False, max_sequence_length=TEXT_TOKENS,
        device=torch.device(device), dtype=torch.float32,
    )
    ours = embed_prompts(text_encoder, tokens, torch.tensor(probe, device=device))
    error = (reference - ours).abs().max().item()
    if error > (1e-4 if torch.device(device).type == "cpu" else 1e-2):  # TF32 matmuls on CUDA
        raise RuntimeError(f"prompt embeddings differ from WanPipeline.encode_prompt's by {error}")
    return error


# ----------------------------------------------------------------------------------------------- VAE


def vae_config(args) -> dict:
    return dict(
        base_dim=args.vae_base_dim,
        z_dim=Z_DIM,
        dim_mult=list(args.vae_dim_mult),
        num_res_blocks=args.vae_res_blocks,
        attn_scales=[],
        temperal_downsample=[False, True, True],
    )


def _causal_convs(module) -> int:
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    return sum(isinstance(m, WanCausalConv3d) for m in module.modules())


def looking_back(vae) -> list[torch.nn.Module]:
    """The VAE's causal convolutions that see earlier frames, except the temporal resampling ones
    (`time_conv`, which turn four frames into one latent frame and back). Through these the output for
    a frame depends on frames far back (about a hundred video frames through the decoder's stack), a
    state a VAE trained on short clips never sees settle: it changes colours and loses the object
    further into a long video (docs/tiny-model.md)."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    return [m for name, m in vae.named_modules()
            if isinstance(m, WanCausalConv3d) and m.kernel_size[0] > 1 and not name.endswith("time_conv")]


@torch.no_grad()
def keep_local_in_time(convs: list[torch.nn.Module]) -> None:
    """`--vae-temporal local`: each conv of `looking_back` keeps only its tap on the current frame, with
    the earlier taps added into it (the same response to a still picture) and then zero. Idempotent: run
    after every optimiser step it keeps the earlier taps at zero. The VAE's memory of the past is then
    the resampling convolutions' few frames, so it behaves the same at every depth of a video, and the
    folder is still a plain `AutoencoderKLWan` (zeros in the weights)."""
    for conv in convs:
        conv.weight[:, :, -1] = conv.weight.sum(dim=2)
        conv.weight[:, :, :-1] = 0.0


def encode_moments(vae, video: torch.Tensor) -> torch.Tensor:
    """(B, 3, 1 + 4k, H, W) in [-1, 1] -> (B, 2 z_dim, 1 + k, H/8, W/8) posterior mean and log-variance.

    The chunking of `AutoencoderKLWan._encode` (frame 0 alone, then 4 frames at a time through the
    causal cache), with a cache of its own and gradients kept.
    """
    cache = [None] * _causal_convs(vae.encoder)
    frames = video.shape[2]
    outs = []
    for i in range(1 + (frames - 1) // TEMPORAL):
        chunk = video[:, :, :1] if i == 0 else video[:, :, 1 + TEMPORAL * (i - 1) : 1 + TEMPORAL * i]
        outs.append(vae.encoder(chunk, feat_cache=cache, feat_idx=[0]))
    return vae.quant_conv(torch.cat(outs, dim=2))


def decode_unclamped(vae, z: torch.Tensor) -> torch.Tensor:
    """(B, z_dim, f, h, w) raw latents -> (B, 3, 1 + 4 (f - 1), 8h, 8w): `AutoencoderKLWan._decode`
    (one latent frame at a time through the causal cache) without its final clamp to [-1, 1], so the
    loss has gradients everywhere."""
    cache = [None] * _causal_convs(vae.decoder)
    x = vae.post_quant_conv(z)
    outs = [
        vae.decoder(x[:, :, i : i + 1], feat_cache=cache, feat_idx=[0], first_chunk=i == 0)
        for i in range(x.shape[2])
    ]
    return torch.cat(outs, dim=2)


def render_clips(specs, frames: int, args, device, *, return_alpha: bool = False):
    """(B, 3, F, H, W) clips in [-1, 1], the layout Wan's VAE takes (and the object's (B, 1, F, H, W) coverage)."""
    video, alpha = toyvideo.render_batch(specs, frames, args.height, args.width, device, return_alpha=True)
    video = video.permute(0, 2, 1, 3, 4).contiguous()
    return (video, alpha.unsqueeze(1)) if return_alpha else video


def reconstruction_adherence(clip: torch.Tensor, colour: str, split: int) -> tuple[float, float]:
    """`quality.adherence` of a (3, F, H, W) clip in [-1, 1] over frames [0, split) and [split, F)."""
    from ds_dualparal.toy.quality import adherence

    frames = ((clip.float().permute(1, 2, 3, 0) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
    return adherence(frames[:split], colour)["adherence"], adherence(frames[split:], colour)["adherence"]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two videos in [-1, 1] (peak-to-peak 2)."""
    mse = F.mse_loss(a.float(), b.float()).item()
    return 10.0 * math.log10(4.0 / max(mse, 1e-12))


def train_vae(args, clock: Clock, device, autocast) -> tuple[torch.nn.Module, Stage]:
    from diffusers import AutoencoderKLWan

    torch.manual_seed(args.seed + 10)
    if args.vae_init is not None:  # go on training a VAE trained before
        vae = AutoencoderKLWan.from_pretrained(args.vae_init / "vae")
    else:
        vae = AutoencoderKLWan(**vae_config(args))
        with torch.no_grad():
            # Start with a narrow posterior: sampling noise of std ~1 around near-zero means hides the
            # input from the decoder until the encoder has learnt to shrink it.
            vae.quant_conv.bias[Z_DIM:] += args.vae_init_logvar
    vae = vae.to(device).train()
    local = looking_back(vae) if args.vae_temporal == "local" else []
    keep_local_in_time(local)
    config = {k: v for k, v in vae.config.items() if k in vae_config(args)}
    stage = Stage(extra={"params": parameter_count(vae), "config": config, "temporal": args.vae_temporal,
                         "init": None if args.vae_init is None else str(args.vae_init)})
    optimizer = torch.optim.AdamW([{"params": list(vae.parameters()), "initial_lr": args.vae_lr}], lr=args.vae_lr,
                                  betas=(0.9, 0.99), weight_decay=0.0)
    specs_rng = torch.Generator().manual_seed(args.seed + 20)
    noise_rng = torch.Generator(device).manual_seed(args.seed + 21)
    plan = Plan(args.vae_steps, clock.budget(args.max_minutes_vae, reserve_s=args.reserve_minutes * 60.0))
    logger.info("VAE: %d parameters, %d steps of %d clips x %d frames at most, %.0f s at most",
                stage.extra["params"], args.vae_steps, args.vae_batch, args.vae_frames, plan.budget_s)
    started = time.perf_counter()
    window_start, window_steps = started, 0
    sums = torch.zeros(3, device=device)  # loss, l1, kl over the log window
    for step in range(args.vae_steps):
        stopped_by = plan.stop(step)
        if stopped_by:
            stage.stopped_by = stopped_by
            break
        set_lr(optimizer, lr_factor(step, plan.progress(step), args.warmup))
        specs = toyvideo.sample_specs(args.vae_batch, specs_rng)
        video, alpha = render_clips(specs, args.vae_frames, args, device, return_alpha=True)
        # The object covers a few percent of a frame but carries the prompt's colour, shape and motion.
        weight = 1.0 + args.vae_object_weight * alpha
        weight = weight / weight.mean()
        with autocast():
            moments = encode_moments(vae, video).float()
            mean, logvar = moments.chunk(2, dim=1)
            logvar = logvar.clamp(-30.0, 20.0)
            z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=noise_rng, device=device)
            recon = decode_unclamped(vae, z).float()
        error = recon - video
        l1 = (weight * error.abs()).mean()
        mse = (weight * error.square()).mean()
        kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()
        loss = l1 + mse + args.vae_kl * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        keep_local_in_time(local)
        sums += torch.stack([loss.detach(), l1.detach(), kl.detach()])
        window_steps += 1
        stage.steps = step + 1
        if stage.steps % args.log_every == 0 or stage.steps == plan.total:
            means = (sums / window_steps).tolist()
            now = time.perf_counter()
            logger.info("vae step %d/%d loss %.4f l1 %.4f kl %.3f lr %.2e %.2f steps/s elapsed %.0fs",
                        stage.steps, plan.total, means[0], means[1], means[2], optimizer.param_groups[0]["lr"],
                        window_steps / (now - window_start), clock.elapsed())
            stage.final_loss = means[0]
            stage.extra.update(final_l1=means[1], final_kl=means[2])
            sums.zero_()
            window_start, window_steps = now, 0
    if window_steps:
        means = (sums / window_steps).tolist()
        stage.final_loss = means[0]
        stage.extra.update(final_l1=means[1], final_kl=means[2])
    if device.type == "cuda":
        torch.cuda.synchronize()
    stage.seconds = time.perf_counter() - started
    stage.extra.update(plan.record())
    vae.eval()

    # Held-out reconstruction (posterior mean, decoded and clamped as WanPipeline does).
    held_out = toyvideo.sample_specs(args.eval_clips, torch.Generator().manual_seed(args.seed + 30))
    with torch.no_grad(), autocast():
        video = render_clips(held_out, args.vae_frames, args, device)
        moments = encode_moments(vae, video).float()
        mean, logvar = moments.chunk(2, dim=1)
        recon = decode_unclamped(vae, mean).float().clamp(-1, 1)
    stage.extra["held_out_psnr_db"] = psnr(recon, video)
    stage.extra["posterior_std"] = float(torch.exp(0.5 * logvar.clamp(-30, 20)).mean())
    # The DiT's clips are longer than the VAE's: its causal caches must hold up over their whole length
    # (a VAE trained on 13 frames only falls apart after ~4 latent frames, and the DiT learns that decay).
    # PSNR is mostly the background's; the object, a few percent of the pixels, carries the prompt: the
    # quality benchmark's adherence of the reconstruction says whether the VAE keeps it (1.0 on the clips).
    long_psnr, halves = [], []
    with torch.no_grad(), autocast():
        for first in range(0, len(held_out), 8):
            specs = held_out[first : first + 8]
            video = render_clips(specs, args.pool_frames, args, device)
            recon = decode_unclamped(vae, encode_moments(vae, video).float().chunk(2, dim=1)[0]).float().clamp(-1, 1)
            tail = video.shape[2] // 2  # the second half, where a decaying cache shows
            long_psnr.append(psnr(recon[:, :, tail:], video[:, :, tail:]))
            halves += [reconstruction_adherence(clip, spec.colour, tail) for clip, spec in zip(recon, specs)]
    stage.extra["held_out_psnr_long_second_half_db"] = sum(long_psnr) / len(long_psnr)
    stage.extra["held_out_adherence_long_first_half"] = sum(h[0] for h in halves) / len(halves)
    stage.extra["held_out_adherence_long_second_half"] = sum(h[1] for h in halves) / len(halves)
    logger.info("VAE: %d steps in %.0f s (stopped by %s), held-out PSNR %.2f dB, %d-frame clips: second half "
                "%.2f dB, adherence of the reconstruction %.2f (first half) %.2f (second half), mean posterior "
                "std %.3f", stage.steps, stage.seconds, stage.stopped_by, stage.extra["held_out_psnr_db"],
                args.pool_frames, stage.extra["held_out_psnr_long_second_half_db"],
                stage.extra["held_out_adherence_long_first_half"], stage.extra["held_out_adherence_long_second_half"],
                stage.extra["posterior_std"])
    return vae, stage


# ------------------------------------------------------------------------------------------ latents


class LatentPool:
    """Latents of toy clips on the device: (N, T, z_dim, h, w) fp32, each with its prompt's index.

    `refresh(n)` re-renders and re-encodes the n oldest clips (round robin) with new specs.
    """

    def __init__(self, n: int, vae, args, device, autocast, specs_rng: torch.Generator, prompt_index: dict[str, int]):
        self.vae, self.args, self.device, self.autocast = vae, args, device, autocast
        self.specs_rng, self.prompt_index = specs_rng, prompt_index
        frames = args.pool_frames
        self.latent_frames = 1 + (frames - 1) // TEMPORAL
        h, w = args.height // SPATIAL, args.width // SPATIAL
        self.latents = torch.empty(n, self.latent_frames, Z_DIM, h, w, device=device)
        self.prompts = torch.empty(n, dtype=torch.long, device=device)
        self.mean = torch.zeros(Z_DIM, device=device)
        self.inv_std = torch.ones(Z_DIM, device=device)
        self.next = 0
        self.refreshed = 0

    @torch.no_grad()
    def _fill(self, start: int, count: int) -> None:
        for lo in range(start, start + count, self.args.encode_batch):
            hi = min(lo + self.args.encode_batch, start + count)
            specs = toyvideo.sample_specs(hi - lo, self.specs_rng)
            with self.autocast():
                video = render_clips(specs, self.args.pool_frames, self.args, self.device)
                mean = encode_moments(self.vae, video).float().chunk(2, dim=1)[0]
            z = (mean.permute(0, 2, 1, 3, 4) - self.mean.view(1, 1, -1, 1, 1)) * self.inv_std.view(1, 1, -1, 1, 1)
            self.latents[lo:hi] = z
            self.prompts[lo:hi] = torch.tensor([self.prompt_index[s.prompt] for s in specs], device=self.device)

    def fill_and_normalise(self) -> tuple[list[float], list[float]]:
        """Encode the whole pool, then measure per-channel mean and std and normalise with them."""
        self._fill(0, self.latents.shape[0])
        z = self.latents.double()
        mean = z.mean(dim=(0, 1, 3, 4))
        std = z.std(dim=(0, 1, 3, 4)).clamp_min(1e-3)
        del z
        self.mean, self.inv_std = mean.float(), (1.0 / std).float()
        self.latents.sub_(self.mean.view(1, 1, -1, 1, 1)).mul_(self.inv_std.view(1, 1, -1, 1, 1))
        return mean.tolist(), std.tolist()

    def fill_like(self, other: "LatentPool") -> None:
        """Encode the whole pool, normalised with `other`'s statistics."""
        self.mean, self.inv_std = other.mean, other.inv_std
        self._fill(0, self.latents.shape[0])

    def normalise_with(self, mean, std) -> None:
        """The per-channel statistics later fills normalise with (rounded as `fill_and_normalise` rounds them)."""
        self.mean = torch.tensor(mean, dtype=torch.float64).float().to(self.device)
        self.inv_std = (1.0 / torch.tensor(std, dtype=torch.float64)).float().to(self.device)

    def replay(self, specs_seed: int, refreshes: int, count: int) -> None:
        """Rebuild the pool as it stood after `refreshes` refreshes of `count` clips, from the seed of its
        specs: a resumed run trains on the clips the uninterrupted run would have."""
        self.specs_rng.manual_seed(specs_seed)
        self.next = self.refreshed = 0
        self._fill(0, self.latents.shape[0])
        for _ in range(refreshes):
            self.refresh(count)

    def refresh(self, count: int) -> None:
        count = min(count, self.latents.shape[0])
        first = min(count, self.latents.shape[0] - self.next)
        self._fill(self.next, first)
        if count > first:
            self._fill(0, count - first)
        self.next = (self.next + count) % self.latents.shape[0]
        self.refreshed += count


# ----------------------------------------------------------------------------------------------- DiT


def dit_config(args, text_dim: int) -> dict:
    return dict(
        patch_size=(1, 2, 2),
        num_attention_heads=args.dit_heads,
        attention_head_dim=args.dit_head_dim,
        in_channels=Z_DIM,
        out_channels=Z_DIM,
        text_dim=text_dim,
        freq_dim=args.dit_freq_dim,
        ffn_dim=args.dit_ffn,
        num_layers=args.dit_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=1024,
    )


# The output projections of a Wan block's three residual branches (self-attention, cross-attention, FFN):
# at zero, the block adds nothing to its input.
BRANCH_OUTPUTS = ("attn1.to_out.0.", "attn2.to_out.0.", "ffn.net.2.")


def grown_state_dict(state: dict, layers: int, new_layers: int) -> dict:
    """A trained DiT's weights for a deeper DiT that computes the same function at the start.

    `new_layers` must be a multiple k of `layers`: trained block i becomes block k i, and blocks k i + 1 …
    k i + k − 1 are copies of it whose branch outputs start at zero (identity blocks, which training then
    opens up; their attention and FFN inputs start from the trained block's, not from noise)."""
    if new_layers % layers:
        raise ValueError(f"--dit-layers {new_layers} must be a multiple of the --dit-init model's {layers} layers")
    k = new_layers // layers
    grown = {}
    for name, value in state.items():
        if not name.startswith("blocks."):
            grown[name] = value
            continue
        _, index, rest = name.split(".", 2)
        for j in range(k):
            zero = j > 0 and rest.startswith(BRANCH_OUTPUTS)
            grown[f"blocks.{k * int(index) + j}.{rest}"] = torch.zeros_like(value) if zero else value.clone()
    return grown


def shift_sigma(u: torch.Tensor, shift: float) -> torch.Tensor:
    """Wan's timestep shift: sigma = s u / (1 + (s - 1) u), as UniPC's `flow_shift` applies it."""
    return shift * u / (1.0 + (shift - 1.0) * u)


def draw_u(n: int, args, generator, device) -> torch.Tensor:
    """Unshifted noise levels in (0, 1): uniform, or logit-normal (mean 0, std 1)."""
    if args.sigma_sampling == "logit-normal":
        return torch.sigmoid(torch.randn(n, generator=generator, device=device))
    return torch.rand(n, generator=generator, device=device).clamp(1e-4, 1.0 - 1e-4)


def frame_sigmas(u: torch.Tensor, length: int, args, generator) -> torch.Tensor:
    """(b, length) per-frame sigmas: the window's sigma, with the context-style jitter at the ends."""
    b, device = u.shape[0], u.device
    uf = u[:, None].expand(b, length).clone()
    if args.context_jitter > 0 and length > 1:
        frame = torch.arange(length, device=device)[None]
        for sign in (-1.0, 1.0):  # -1: the first frames are cleaner, +1: the last ones noisier
            apply = torch.rand(b, generator=generator, device=device) < args.context_jitter
            count = 1 + (torch.rand(b, generator=generator, device=device) * min(3, length - 1)).long()
            delta = args.jitter_max * torch.rand(b, generator=generator, device=device)
            ends = frame < count[:, None] if sign < 0 else frame >= length - count[:, None]
            moved = (u[:, None] + sign * delta[:, None]).clamp(0.0, 1.0 - 1e-4)
            uf = torch.where(apply[:, None] & ends, moved, uf)
    return shift_sigma(uf, args.flow_shift)


def dit_batch(pool: LatentPool, empty_index: int, length: int, batch: int, args, generator, *, dropout: bool = True,
              context_jitter: bool = True):
    """One training batch: (x_t, timestep, prompt indices, target) for crops of `length` latent frames."""
    device = pool.latents.device
    n, frames = pool.latents.shape[:2]
    clip = torch.randint(0, n, (batch,), generator=generator, device=device)
    start = torch.randint(0, frames - length + 1, (batch,), generator=generator, device=device)
    if args.first_frame_prob > 0:  # drawn only when asked, so runs without it keep their random streams
        at_first = torch.rand(batch, generator=generator, device=device) < args.first_frame_prob
        start = torch.where(at_first, torch.zeros_like(start), start)
    index = start[:, None] + torch.arange(length, device=device)[None]
    x0 = pool.latents[clip[:, None], index].permute(0, 2, 1, 3, 4).contiguous()  # (b, C, L, h, w)
    prompts = pool.prompts[clip]
    if dropout and args.cfg_dropout > 0:
        drop = torch.rand(batch, generator=generator, device=device) < args.cfg_dropout
        prompts = torch.where(drop, torch.full_like(prompts, empty_index), prompts)
    u = draw_u(batch, args, generator, device)
    sigma = shift_sigma(u, args.flow_shift)
    if context_jitter:
        per_frame = frame_sigmas(u, length, args, generator)
    else:
        per_frame = sigma[:, None].expand(batch, length)
    noise = torch.randn(x0.shape, generator=generator, device=device)
    s = per_frame[:, None, :, None, None]
    x_t = (1.0 - s) * x0 + s * noise
    return x_t, sigma * 1000.0, prompts, noise - x0


class TextToVideo(torch.nn.Module):
    """The DiT and the UMT5 text encoder, trained and averaged (EMA) together: the prompt's words reach
    the DiT through an encoder that learns to tell them apart."""

    def __init__(self, transformer, text_encoder):
        super().__init__()
        self.transformer = transformer
        self.text_encoder = text_encoder

    def forward(self, x_t, timestep, prompts, tokens: PromptTokens):
        text = embed_prompts(self.text_encoder, tokens, prompts)
        return self.transformer(x_t, timestep, text, return_dict=False)[0]


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    ema_params = [p for p in ema.parameters()]
    params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)


@torch.no_grad()
def validation_loss(model, val, tokens: PromptTokens, autocast) -> float:
    total = 0.0
    for x_t, timestep, prompts, target in val:
        with autocast():
            pred = model(x_t, timestep, prompts, tokens)
        total += F.mse_loss(pred.float(), target).item()
    return total / len(val)


# --------------------------------------------------------------------------------------------- state

STATE_TENSORS, STATE_META = "state.safetensors", "state.json"


class StateWriter:
    """Saves what resuming the DiT stage needs into --state: the trained and averaged weights, AdamW's
    moments, the generators, the step and plan, the trained VAE (`vae/`, with its latent statistics) and
    the log of what ran before. Written under a temporary name and swapped in whole, so a process killed
    while saving leaves the previous state intact."""

    def __init__(self, path: Path, args, vae, log: dict, clock: Clock, earlier_seconds: float):
        self.path, self.args, self.vae, self.log = path, args, vae, log
        self.clock, self.earlier_seconds = clock, earlier_seconds

    def write(self, model, ema, optimizer, step: int, plan: Plan, generators: dict, stage: "Stage") -> None:
        from safetensors.torch import save_file

        tensors = {}
        # clone: the text encoder ties its embeddings, and safetensors refuses tensors that share memory
        for prefix, module in (("model", model), ("ema", ema)):
            tensors.update({f"{prefix}.{k}": v.detach().clone().contiguous() for k, v in module.state_dict().items()})
        optim = optimizer.state_dict()
        for index, moments in optim["state"].items():
            tensors.update({f"adam.{index}.{k}": torch.as_tensor(v).detach().clone() for k, v in moments.items()})
        tensors.update({f"rng.{name}": g.get_state() for name, g in generators.items()})
        meta = {
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(self.args).items()},
            "step": step,
            "plan": plan.record(),
            "dit_seconds": plan.elapsed(),
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in optim["param_groups"]],
            "stage": dataclasses.asdict(stage),
            "log": {**self.log, "total_seconds": self.earlier_seconds + self.clock.elapsed()},
        }
        partial = self.path.parent / f".{self.path.name}.partial-{os.getpid()}"
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        save_file({k: v.cpu() for k, v in tensors.items()}, partial / STATE_TENSORS)
        self.vae.save_pretrained(partial / "vae")
        (partial / STATE_META).write_text(json.dumps(meta, indent=1) + "\n")
        old = self.path.parent / f".{self.path.name}.old-{os.getpid()}"
        if self.path.exists():
            self.path.rename(old)
        partial.rename(self.path)
        if old.exists():
            shutil.rmtree(old)
        logger.info("state at DiT step %d saved to %s", step, self.path)


def restore_state(path: Path, model, ema, optimizer, generators: dict, device) -> dict:
    """Loads what `StateWriter.write` saved into the modules, optimizer and generators; returns its meta."""
    from safetensors.torch import load_file

    meta = json.loads((path / STATE_META).read_text())
    tensors = load_file(path / STATE_TENSORS, device="cpu")
    for prefix, module in (("model", model), ("ema", ema)):
        module.load_state_dict({k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")})
    moments: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("adam."):
            _, index, name = key.split(".", 2)
            moments.setdefault(int(index), {})[name] = value if name == "step" else value.to(device)
    groups = optimizer.state_dict()["param_groups"]
    for group, saved in zip(groups, meta["param_groups"]):
        group.update({k: v for k, v in saved.items() if k != "params"})
    optimizer.load_state_dict({"state": moments, "param_groups": groups})
    for name, g in generators.items():
        g.set_state(tensors[f"rng.{name}"])
    return meta


def train_dit(args, clock: Clock, device, autocast, pool: LatentPool, held_out: LatentPool, tokens: PromptTokens,
              empty_index: int, text_encoder, state: StateWriter, resume: Path | None):
    """The DiT (and, with --text-lr > 0, the text encoder) by flow matching; returns the EMA TextToVideo,
    its Stage and whether the stage paused (to be resumed from --state)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(args.seed + 40)
    config = dit_config(args, text_encoder.config.d_model)
    train_text = args.text_lr > 0
    transformer = WanTransformer3DModel(**config)
    if args.dit_init is not None:  # go on from a model trained before (its VAE may have changed since)
        from transformers import UMT5EncoderModel

        trained = WanTransformer3DModel.from_pretrained(args.dit_init / "transformer")
        transformer.load_state_dict(grown_state_dict(trained.state_dict(), trained.config.num_layers, args.dit_layers))
        text_encoder.load_state_dict(UMT5EncoderModel.from_pretrained(args.dit_init / "text_encoder").state_dict())
    model = TextToVideo(transformer, text_encoder.requires_grad_(train_text))
    model = model.to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    stage = Stage(extra={"params": parameter_count(model.transformer), "config": config,
                         "text_encoder_trained": train_text,
                         "init": None if args.dit_init is None else str(args.dit_init)})
    decay, no_decay = [], []
    for name, p in model.transformer.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name or "scale_shift_table" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": args.dit_weight_decay, "initial_lr": args.dit_lr},
              {"params": no_decay, "weight_decay": 0.0, "initial_lr": args.dit_lr}]
    if train_text:
        groups.append({"params": list(model.text_encoder.parameters()), "weight_decay": 0.0,
                       "initial_lr": args.text_lr})
    optimizer = torch.optim.AdamW(groups, lr=args.dit_lr, betas=(0.9, 0.99), fused=device.type == "cuda")
    forward = torch.compile(model, dynamic=True) if args.compile else model
    rng = torch.Generator(device).manual_seed(args.seed + 50)
    crop_rng = torch.Generator().manual_seed(args.seed + 52)  # on the CPU: the crop length needs no device sync
    generators = {"batch": rng, "crop": crop_rng}
    # Held-out clips, fixed crops and noise: low-variance losses to follow (all sigmas, prompts kept), on
    # crops of the longest length and on whole clips.
    val_rng = torch.Generator(device).manual_seed(args.seed + 51)
    max_crop = min(args.max_crop, pool.latent_frames)
    val = {name: [dit_batch(held_out, empty_index, length, args.eval_clips, args, val_rng, dropout=False,
                            context_jitter=False) for _ in range(2)]
           for name, length in (("crop", max_crop), ("whole", pool.latent_frames))}
    # the margin leaves room for the pool refreshes and held-out losses the measured steps may not include
    # --max-minutes-dit is the stage's time over all processes (resumes included) and fixes the step count;
    # what this process has left of --max-minutes only pauses it
    deadline = clock.budget(None, reserve_s=args.reserve_minutes * 60.0)
    budget = 60.0 * args.max_minutes_dit if args.max_minutes_dit is not None else deadline
    plan = Plan(args.dit_steps, budget, margin=0.92, deadline_s=deadline)
    if resume is not None:
        meta = restore_state(resume, model, ema, optimizer, generators, device)
        first = meta["step"]
        plan.restore(meta["plan"], meta["dit_seconds"])
        stage = Stage(**meta["stage"])
        every = args.pool_refresh_every
        pool.replay(args.seed + 60, len(range(every, first, every)) if every else 0, args.pool_refresh_clips)
        logger.info("resumed at DiT step %d of %d from %s (%.0f s of DiT so far)", first, plan.total, resume,
                    meta["dit_seconds"])
    else:
        first = 0
    logger.info("DiT: %d parameters (text encoder %s), %d steps at most, crops of %d..%d latent frames and whole "
                "clips of %d with probability %.2f, %d windows at %d frames, %.0f s at most, this process %.0f s",
                stage.extra["params"], "trained" if train_text else "frozen", plan.total, args.min_crop, max_crop,
                pool.latent_frames, args.whole_clip_prob, args.dit_batch, max_crop, plan.budget_s, deadline)
    started = time.perf_counter()
    last_save = started
    window_start, window_steps = started, 0
    loss_sum = torch.zeros((), device=device)
    lengths = []
    step = first
    stage.stopped_by = "steps"
    for step in range(first, args.dit_steps):
        stopped_by = plan.stop(step) or ("paused" if step == args.pause_at_step else None)
        if stopped_by:
            stage.stopped_by = stopped_by
            break
        set_lr(optimizer, lr_factor(step, plan.progress(step), args.warmup))
        if args.pool_refresh_every and step and step % args.pool_refresh_every == 0:
            pool.refresh(args.pool_refresh_clips)
        whole = float(torch.rand((), generator=crop_rng)) < args.whole_clip_prob
        length = pool.latent_frames if whole else int(torch.randint(args.min_crop, max_crop + 1, (1,),
                                                                    generator=crop_rng))
        batch = max(1, args.dit_batch * max_crop // length)
        lengths.append(length)
        x_t, timestep, prompts, target = dit_batch(pool, empty_index, length, batch, args, rng)
        with autocast():
            pred = forward(x_t, timestep, prompts, tokens)
        loss = F.mse_loss(pred.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        ema_update(ema, model, min(args.ema, (1.0 + step) / (10.0 + step)))
        loss_sum += loss.detach()
        window_steps += 1
        stage.steps = step + 1
        if stage.steps % args.log_every == 0 or stage.steps == plan.total:
            now = time.perf_counter()
            stage.final_loss = (loss_sum / window_steps).item()
            message = (f"dit step {stage.steps}/{plan.total} loss {stage.final_loss:.4f} "
                       f"lr {optimizer.param_groups[0]['lr']:.2e} {window_steps / (now - window_start):.2f} steps/s "
                       f"elapsed {clock.elapsed():.0f}s")
            if args.eval_every and stage.steps % args.eval_every == 0:
                message += f" val(ema) {validation_loss(ema, val['crop'], tokens, autocast):.4f}"
            logger.info(message)
            loss_sum.zero_()
            window_start, window_steps = time.perf_counter(), 0
            if args.save_every_minutes and now - last_save >= 60.0 * args.save_every_minutes:
                state.write(model, ema, optimizer, stage.steps, plan, generators, stage)
                last_save = time.perf_counter()
    if window_steps:
        stage.final_loss = (loss_sum / window_steps).item()
    if device.type == "cuda":
        torch.cuda.synchronize()
    stage.seconds = plan.elapsed()
    stage.extra.update(plan.record())
    stage.extra.setdefault("processes", []).append(
        {"from_step": first, "to_step": stage.steps, "seconds": time.perf_counter() - started})
    if stage.stopped_by == "paused" or args.save_every_minutes:
        state.write(model, ema, optimizer, stage.steps, plan, generators, stage)
    for name, batches in val.items():
        stage.extra[f"val_loss_{name}_ema"] = validation_loss(ema, batches, tokens, autocast)
        stage.extra[f"val_loss_{name}_model"] = validation_loss(model, batches, tokens, autocast)
    stage.extra["pool_clips_refreshed"] = pool.refreshed
    stage.extra["mean_crop_length"] = sum(lengths) / max(1, len(lengths))
    logger.info("DiT: %d steps in %.0f s (stopped by %s), held-out loss %.4f (EMA) %.4f (raw), whole clips %.4f (EMA)",
                stage.steps, stage.seconds, stage.stopped_by, stage.extra["val_loss_crop_ema"],
                stage.extra["val_loss_crop_model"], stage.extra["val_loss_whole_ema"])
    return ema, stage


# ---------------------------------------------------------------------------------------------- main

# What a resumed run takes from its flags; everything else comes from the state's saved settings.
RESUME_FLAGS = ("out", "state", "resume", "device", "max_minutes", "reserve_minutes", "save_every_minutes",
                "pause_at_step", "log_every", "smoke")
PATH_FLAGS = ("out", "state", "resume", "vae_from", "vae_init", "dit_init")

SMOKE = dict(
    vae_steps=2, vae_batch=1, vae_frames=5, dit_steps=3, dit_batch=2, pool_clips=4, pool_frames=9,
    encode_batch=4, min_crop=2, max_crop=3, log_every=1, eval_every=0, eval_clips=2, pool_refresh_every=2,
    pool_refresh_clips=2, warmup=2,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python launch/train_tiny.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the model folder to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true",
                        help="a few steps on tiny batches (a CPU test); explicit flags still override: "
                        + ", ".join(f"{k}={v}" for k, v in SMOKE.items()))
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--max-minutes", type=float, default=None, help="wall-time limit of the whole run")
    parser.add_argument("--reserve-minutes", type=float, default=0.3,
                        help="kept from --max-minutes for the steps after a stage (encoding, saving)")
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=200, help="learning-rate warm-up steps (both stages)")
    parser.add_argument("--eval-clips", type=int, default=32, help="held-out clips for the PSNR / loss checks")
    parser.add_argument("--eval-every", type=int, default=1000,
                        help="DiT steps between held-out losses in the log (0: only at the end)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast (default: on for CUDA, off on CPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the DiT (dynamic shapes)")
    parser.add_argument("--shard-size", default="1MB", help="transformer shard size (several shards, like Wan's)")
    parser.add_argument("--state", type=Path, default=None,
                        help="where the DiT stage saves what --resume needs (default: --out with .state added)")
    parser.add_argument("--save-every-minutes", type=float, default=0.0,
                        help="also save the state this often and when the DiT stage ends (0: only when it pauses)")
    parser.add_argument("--pause-at-step", type=int, default=None,
                        help="pause the DiT stage before this step: save the state and the model so far")
    parser.add_argument("--resume", type=Path, default=None,
                        help="a --state folder: go on with its DiT stage, with its settings (flags other than "
                             f"{', '.join('--' + f.replace('_', '-') for f in RESUME_FLAGS)} are taken from it)")

    vae = parser.add_argument_group("VAE")
    vae.add_argument("--vae-from", type=Path, default=None,
                     help="take vae/ from this model folder instead of training one (its statistics are redone)")
    vae.add_argument("--vae-init", type=Path, default=None,
                     help="start the VAE from this model folder's vae/ and train it --vae-steps more")
    vae.add_argument("--vae-steps", type=int, default=20000)
    vae.add_argument("--max-minutes-vae", type=float, default=None)
    vae.add_argument("--vae-batch", type=int, default=6, help="clips a step")
    vae.add_argument("--vae-frames", type=int, default=81,
                     help="frames a clip (4k+1); long enough for the causal caches to reach their steady state")
    vae.add_argument("--vae-lr", type=float, default=1e-3)
    vae.add_argument("--vae-init-logvar", type=float, default=-6.0,
                     help="added to the posterior's initial log-variance (0: diffusers' initialisation)")
    vae.add_argument("--vae-object-weight", type=float, default=3.0,
                     help="extra loss weight of the object's pixels (weight 1 + this x coverage, mean 1)")
    vae.add_argument("--vae-kl", type=float, default=3e-5, help="weight of the KL term (per-element means)")
    vae.add_argument("--vae-base-dim", type=int, default=16)
    vae.add_argument("--vae-dim-mult", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 4])
    vae.add_argument("--vae-res-blocks", type=int, default=1)
    vae.add_argument("--vae-temporal", choices=["full", "local"], default="local",
                     help="local: the convolutions outside the temporal resampling see the current frame only "
                          "(earlier taps folded in, then kept at zero), so the VAE is the same at every depth "
                          "of a long video; full: Wan's causal convolutions as they are")

    dit = parser.add_argument_group("DiT")
    dit.add_argument("--dit-init", type=Path, default=None,
                     help="start the DiT and the text encoder from this model folder's (same sizes, or a DiT "
                          "with k times fewer layers: each trained layer is followed by k - 1 copies that start "
                          "as identity blocks)")
    dit.add_argument("--dit-steps", type=int, default=40000)
    dit.add_argument("--max-minutes-dit", type=float, default=None)
    dit.add_argument("--dit-batch", type=int, default=256,
                     help="windows a step at the longest crop; shorter crops take proportionally more")
    dit.add_argument("--dit-lr", type=float, default=5e-4)
    dit.add_argument("--dit-weight-decay", type=float, default=0.01)
    dit.add_argument("--dit-layers", type=int, default=4)
    dit.add_argument("--dit-heads", type=int, default=4)
    dit.add_argument("--dit-head-dim", type=int, default=32)
    dit.add_argument("--dit-ffn", type=int, default=512)
    dit.add_argument("--dit-freq-dim", type=int, default=256)
    dit.add_argument("--ema", type=float, default=0.999)
    dit.add_argument("--pool-clips", type=int, default=8192, help="clips whose latents the DiT trains on")
    dit.add_argument("--pool-frames", type=int, default=161, help="frames a pool clip (4k+1)")
    dit.add_argument("--pool-refresh-every", type=int, default=500, help="steps between pool refreshes (0: never)")
    dit.add_argument("--pool-refresh-clips", type=int, default=512)
    dit.add_argument("--encode-batch", type=int, default=128, help="clips rendered and encoded at once")
    dit.add_argument("--min-crop", type=int, default=2, help="shortest crop, latent frames")
    dit.add_argument("--max-crop", type=int, default=13, help="longest crop, latent frames")
    dit.add_argument("--whole-clip-prob", type=float, default=0.2,
                     help="probability that a step takes whole pool clips instead of crops (long context)")
    dit.add_argument("--first-frame-prob", type=float, default=0.0,
                     help="probability that a crop starts at its clip's first latent frame (the one video frame "
                          "the VAE encodes alone, which a uniform start reaches about once in 30 crops)")
    dit.add_argument("--text-lr", type=float, default=1e-3,
                     help="learning rate of the text encoder, trained with the DiT (0: frozen)")
    dit.add_argument("--cfg-dropout", type=float, default=0.1)
    dit.add_argument("--flow-shift", type=float, default=3.0)
    dit.add_argument("--sigma-sampling", choices=["uniform", "logit-normal"], default="uniform")
    dit.add_argument("--context-jitter", type=float, default=0.25,
                     help="probability, at each end of a crop, of frames at another noise level")
    dit.add_argument("--jitter-max", type=float, default=0.3, help="largest such change of the unshifted level")

    if parser.parse_known_args(argv)[0].smoke:
        parser.set_defaults(**SMOKE)  # flags given explicitly still win
    args = parser.parse_args(argv)
    if args.state is None:
        args.state = args.out.parent / (args.out.name + ".state")
    if args.resume is not None:
        meta = args.resume / STATE_META
        if not meta.is_file():
            parser.error(f"--resume {args.resume} holds no {STATE_META}: give a --state folder of an earlier run")
        saved = json.loads(meta.read_text())["args"]
        for name, value in saved.items():
            if name not in RESUME_FLAGS:
                setattr(args, name, Path(value) if name in PATH_FLAGS and value is not None else value)
    if args.state.exists():
        parser.error(f"--state {args.state} exists; give a new folder (a resumed run keeps the one it resumes)")
    for name in ("whole_clip_prob", "first_frame_prob"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            parser.error(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    if args.text_lr < 0:
        parser.error(f"--text-lr must be >= 0, got {args.text_lr}")
    for name in ("vae_frames", "pool_frames"):
        if (getattr(args, name) - 1) % TEMPORAL:
            parser.error(f"--{name.replace('_', '-')} must be 4k+1, got {getattr(args, name)}")
    if args.height % 16 or args.width % 16:
        parser.error("--height and --width must be multiples of 16")
    pool_latent_frames = 1 + (args.pool_frames - 1) // TEMPORAL
    if not 1 <= args.min_crop <= min(args.max_crop, pool_latent_frames):
        parser.error(f"need 1 <= --min-crop <= --max-crop and a pool clip's {pool_latent_frames} latent frames")
    if args.dit_head_dim % 2:  # Wan's rotary parts: h = w = 2 (d // 6), t = d - h - w, all even
        parser.error(f"--dit-head-dim must be even for Wan's rotary embedding, got {args.dit_head_dim}")
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        parser.error(f"--out {args.out} exists and is not an empty folder; give a new one")
    _check_up_front(parser, args)
    return args


def _check_up_front(parser, args) -> None:
    """What would otherwise fail only after training (or with a traceback): the place the model goes,
    the device, the seed and the VAE to start from; and a time limit that leaves no time to train."""
    from ds_dualparal.files import location_problem

    problem = location_problem(args.out, folder=True)
    if problem is not None:
        parser.error(f"--out {args.out} {problem}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device!r} is not a device; use cpu or cuda[:N]")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine; use cpu")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {args.device}: use cpu or cuda[:N]")
    if not 0 <= args.seed < 2**32:  # the stages seed torch with --seed + a few; far below torch's 64 bits
        parser.error(f"--seed must be in [0, {2**32}), got {args.seed}")
    if args.vae_from is not None and not (args.vae_from / "vae" / "config.json").is_file():
        parser.error(f"--vae-from {args.vae_from} holds no vae/config.json (a tiny model folder written by this script)")
    if args.dit_init is not None:
        config_file = args.dit_init / "transformer" / "config.json"
        if not config_file.is_file():
            parser.error(f"--dit-init {args.dit_init} holds no transformer/config.json (a tiny model folder)")
        try:
            config = json.loads(config_file.read_text())
            layers = config.get("num_layers")
        except (ValueError, AttributeError):
            parser.error(f"--dit-init {config_file} is not a JSON object of a transformer's config")
        sizes = {"num_attention_heads": "dit_heads", "attention_head_dim": "dit_head_dim", "ffn_dim": "dit_ffn",
                 "freq_dim": "dit_freq_dim"}
        for key, flag in sizes.items():
            if config.get(key) != getattr(args, flag):
                parser.error(f"--{flag.replace('_', '-')} {getattr(args, flag)} differs from the --dit-init model's "
                             f"{key} {config.get(key)}; only the number of layers may grow")
        if not isinstance(layers, int) or layers < 1 or args.dit_layers % layers:
            parser.error(f"--dit-layers {args.dit_layers} must be a multiple of the --dit-init model's "
                         f"{layers} layers")
    for name in ("max_minutes", "max_minutes_vae", "max_minutes_dit"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            parser.error(f"--{name.replace('_', '-')} must be a number of minutes above 0, got {value}")


def publish_folder(out: Path, write) -> str | None:
    """`write(partial)` fills a temporary folder beside `out`, which is then renamed to `out` (an empty
    folder there is replaced). On a write that fails (a full or read-only disk), the temporary folder is
    removed and the one-line reason returned; nothing appears at `out`."""
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        write(partial)
        if out.exists():  # the empty folder the arguments were checked against
            out.rmdir()
        partial.rename(out)
    except OSError as err:
        shutil.rmtree(partial, ignore_errors=True)
        return f"--out: cannot write the model folder {out} ({err.strerror or err}); nothing was written there"
    return None


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    args = parse_args(argv)
    clock = Clock(args.max_minutes)
    device = torch.device(args.device)
    use_bf16 = device.type == "cuda" if args.bf16 is None else args.bf16
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    def autocast():
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16)

    torch.manual_seed(args.seed)
    logger.info("device %s%s, bf16 autocast %s, seed %d", device,
                f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "", use_bf16, args.seed)
    earlier = json.loads((args.resume / STATE_META).read_text())["log"] if args.resume else None

    # 1. text: the tiny UMT5 (random, seed S + 3) and the token ids of every toy prompt and ""
    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(args.seed + 3).to(device)
    prompts = toyvideo.all_prompts()
    prompt_index = {p: i for i, p in enumerate(prompts)}
    empty_index = len(prompts)
    tokens = PromptTokens(prompts + [""], tokenizer, device)
    check_prompt_embeddings(prompts + [""], text_encoder.eval(), tokenizer, tokens, device)

    # 2. VAE
    from diffusers import AutoencoderKLWan

    if earlier is not None:
        vae = AutoencoderKLWan.from_pretrained(args.resume / "vae").to(device).eval()
        vae_stage = Stage(**earlier["vae"])
    elif args.vae_from is not None:
        vae = AutoencoderKLWan.from_pretrained(args.vae_from / "vae").to(device).eval()
        vae_stage = Stage(stopped_by="loaded", extra={"from": str(args.vae_from), "params": parameter_count(vae)})
    else:
        vae, vae_stage = train_vae(args, clock, device, autocast)
    vae.requires_grad_(False)

    # 3. latents of the DiT's clip pool, and the VAE's latent statistics (measured once, kept on resume)
    t0 = time.perf_counter()
    pool = LatentPool(args.pool_clips, vae, args, device, autocast, torch.Generator().manual_seed(args.seed + 60),
                      prompt_index)  # seed + 60: LatentPool.replay rebuilds it from there
    if earlier is not None:  # the DiT stage rebuilds the pool as it stood at the saved step
        latents_mean, latents_std = earlier["latents"]["mean"], earlier["latents"]["std"]
        pool.normalise_with(latents_mean, latents_std)
    else:
        latents_mean, latents_std = pool.fill_and_normalise()
    held_out = LatentPool(args.eval_clips, vae, args, device, autocast, torch.Generator().manual_seed(args.seed + 61),
                          prompt_index)
    held_out.fill_like(pool)
    vae.register_to_config(latents_mean=latents_mean, latents_std=latents_std)
    pool_seconds = time.perf_counter() - t0
    logger.info("pool: %d clips of %d frames -> %s latents in %.1f s; latent std per channel %s", args.pool_clips,
                args.pool_frames, tuple(pool.latents.shape), pool_seconds, [round(s, 3) for s in latents_std])

    # 4. DiT (and text encoder)
    log = {
        "vae": dataclasses.asdict(vae_stage),
        "latents": {"mean": latents_mean, "std": latents_std, "pool_seconds": pool_seconds},
    }
    state = StateWriter(args.state, args, vae, log, clock, earlier["total_seconds"] if earlier else 0.0)
    model, dit_stage = train_dit(args, clock, device, autocast, pool, held_out, tokens, empty_index, text_encoder,
                                 state, args.resume)
    model = model.to("cpu")  # fp32 throughout: autocast only changed the compute
    text_error = check_prompt_embeddings(prompts + [""], model.text_encoder, tokenizer,
                                         PromptTokens(prompts + [""], tokenizer, "cpu"), "cpu")

    # 5. the model folder: written beside --out under a temporary name, renamed when complete, so a
    # run that dies while saving leaves no folder at --out that looks like a model
    def write(partial: Path) -> None:
        nonlocal log
        save_pipeline(
            partial,
            transformer=model.transformer,
            vae=vae.to("cpu"),
            text_encoder=model.text_encoder,
            tokenizer=tokenizer,
            scheduler=build_scheduler(),
            max_shard_size=args.shard_size,
        )
        files = {str(p.relative_to(partial)): p.stat().st_size for p in sorted(partial.rglob("*.safetensors"))}
        log = {
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
            "torch": torch.__version__,
            "bf16": use_bf16,
            **log,
            "dit": dataclasses.asdict(dit_stage),
            "text_encoder_params": parameter_count(model.text_encoder),
            "text_embedding_error_vs_wanpipeline": text_error,
            "safetensors_bytes": files,
            "total_safetensors_bytes": sum(files.values()),
            "total_seconds": clock.elapsed() + (earlier["total_seconds"] if earlier else 0.0),
        }
        (partial / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")

    problem = publish_folder(args.out, write)
    if problem is not None:
        logger.error("%s", problem)
        return 1
    logger.info("wrote %s (%.1f MB of weights) in %.0f s%s", args.out, log["total_safetensors_bytes"] / 1e6,
                log["total_seconds"], "; paused: --resume " + str(args.state) + " goes on"
                if dit_stage.stopped_by == "paused" else "")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
