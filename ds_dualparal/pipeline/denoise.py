"""Block-wise denoising (docs/DESIGN.md §1): latents and schedulers of the blocks, the per-block-step
window state that every stage builds for itself, and the single-process reference.

The reference runs the block-steps in the timeline's sequential order through every layer in one
process. It is the oracle: the pipelined engine must reproduce its latents bit for bit.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from ..config import SCHEDULERS
from ..wan.model import Conditioner, FeatureCache, WindowState
from .image import ImageCondition
from .timeline import BlockStep, BlockTimeline
from .unipc import UniPC

# Wan's UniPC settings, for folders whose scheduler config is missing.
_WAN_UNIPC = dict(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000)


def make_scheduler(kind: str, flow_shift: float, steps: int, scheduler_folder: Path | None = None, device="cpu"):
    """diffusers' scheduler, as WanPipeline would step with it, with its timesteps set: the plan's timesteps,
    and what `block_scheduler` makes the blocks' of."""
    if kind == "unipc":
        config_file = scheduler_folder / "scheduler_config.json" if scheduler_folder else None
        if config_file is not None and config_file.is_file():
            config = json.loads(config_file.read_text())
            config = {k: v for k, v in config.items() if not k.startswith("_")}
        else:
            config = dict(_WAN_UNIPC)
        config["flow_shift"] = flow_shift
        scheduler = UniPCMultistepScheduler.from_config(config)
    elif kind == "euler":
        scheduler = FlowMatchEulerDiscreteScheduler(shift=flow_shift, num_train_timesteps=1000)
    else:
        raise ValueError(f"scheduler {kind!r}: allowed {SCHEDULERS}")
    scheduler.set_timesteps(steps, device=device)
    return scheduler


def block_scheduler(scheduler):
    """What a block steps with (each block its own copy: UniPC keeps a history). UniPC: `unipc.UniPC`,
    the same updates with its coefficients worked out once on the host, where diffusers' step waits
    for the GPU several times; flow-match Euler: diffusers' as is, whose sigmas and timesteps stay on
    the host, so its step waits for nothing. Raises ValueError for UniPC settings that UniPC lacks."""
    return UniPC(scheduler) if isinstance(scheduler, UniPCMultistepScheduler) else copy.deepcopy(scheduler)


@dataclass
class GenerationPlan:
    """What every stage knows of one generation; identical on all ranks."""

    timeline: BlockTimeline
    timesteps: torch.Tensor  # t_0 > ... > t_{T-1}
    latent_height: int
    latent_width: int
    patch_size: tuple[int, int, int]
    guidance: tuple[float, ...]  # per expert; CFG is off when every value is <= 1
    boundary_timestep: float | None = None  # Wan2.2: t >= boundary -> expert 0, else expert 1
    # The prompt plan (prompts.py): how many distinct texts, and per block its (text, weight) pairs;
    # None: every block uses text 0 as is.
    num_texts: int = 1
    text_mixes: tuple[tuple[tuple[int, float], ...], ...] | None = None
    # Image-to-video (image.py): CLIP tokens shared with every stage (0: none), and whether the first
    # latent frame is the image's, held clean at timestep 0 (Wan2.2-TI2V).
    image_tokens: int = 0
    clean_first_frame: bool = False

    @property
    def cfg(self) -> bool:
        return any(g > 1.0 for g in self.guidance)

    @property
    def batch(self) -> int:
        return 2 if self.cfg else 1

    @property
    def patch_grid(self) -> tuple[int, int]:
        return self.latent_height // self.patch_size[1], self.latent_width // self.patch_size[2]

    def tokens_per_frame(self) -> int:
        h, w = self.patch_grid
        return h * w

    def window_frames(self, block: int) -> int:
        start, stop = self.timeline.window_range(block)
        return stop - start

    def text_mix(self, block: int) -> tuple[tuple[int, float], ...]:
        """Block `block`'s (text index, weight) pairs."""
        return ((0, 1.0),) if self.text_mixes is None else self.text_mixes[block]

    def expert(self, step: int) -> int:
        if self.boundary_timestep is None or float(self.timesteps[step]) >= self.boundary_timestep:
            return 0
        return 1

    def hidden_shape(self, block: int, dim: int) -> tuple[int, int, int]:
        """Shape of the activations that travel between stages for a block-step of `block`."""
        return (self.batch, self.window_frames(block) * self.tokens_per_frame(), dim)

    def prediction_shape(self, block: int, channels: int) -> tuple[int, ...]:
        frames = self.timeline.block_len(block)
        return (1, channels, frames, self.latent_height, self.latent_width)


class WindowBuilder:
    """Makes a block-step's `WindowState` on one stage: its own timestep and text embeddings, RoPE, cache flags."""

    def __init__(self, plan: GenerationPlan, conditioners: list[Conditioner], texts: torch.Tensor, device,
                 image: torch.Tensor | None = None):
        self.plan = plan
        self.conditioners = conditioners
        # (num_texts, batch, L, text_dim): the plan's distinct texts, each cond then uncond
        assert texts.ndim == 4 and texts.shape[0] == plan.num_texts, (
            f"text embeddings of shape {tuple(texts.shape)}; the plan has {plan.num_texts} text(s)")
        self.texts = texts
        # (1, tokens, image_dim): the image's CLIP tokens, the same for cond and uncond as in diffusers
        assert (image is None) == (plan.image_tokens == 0), "image tokens without a plan for them, or none given"
        self.image = None if image is None else image.expand(plan.batch, *image.shape[1:])
        self.device = torch.device(device)
        self.timesteps = plan.timesteps.to(self.device)  # once, not a host-to-device copy per block-step
        self.cache = FeatureCache()
        self._rope = {}
        # The condition embeddings, each made once for what it depends on and dropped after the last
        # block-step (in sequential order) that reads it: at most a time embedding per step in flight
        # and a text projection per text mix in use. Correct in any order; a key built again after its
        # last use (not in sequential order) is only computed again.
        self._embeddings: dict[tuple, object] = {}
        self._last_use: dict[tuple, BlockStep] = {}
        for step in plan.timeline.block_steps():
            for key in self._embedding_keys(step):
                self._last_use[key] = step

    def rotary(self, expert: int, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (expert, frames)
        if key not in self._rope:
            cos, sin = self.conditioners[expert].rotary(frames, *self.plan.patch_grid, self.device)
            if self.texts.dtype != torch.float32:
                # diffusers rotates in float64; in half precision fp32 angles give the same
                # rounded result for a third of the memory traffic.
                cos, sin = cos.float(), sin.float()
            self._rope[key] = (cos, sin)
        return self._rope[key]

    def text(self, block: int) -> torch.Tensor:
        """Block `block`'s text embeddings (batch, L, text_dim): its text as is, or its blend (in fp32,
        rounded once to the texts' dtype; a few element-wise operations, next to a block-step's work)."""
        mix = self.plan.text_mix(block)
        if len(mix) == 1:
            return self.texts[mix[0][0]]
        blend = sum(weight * self.texts[index].float() for index, weight in mix)
        return blend.to(self.texts.dtype)

    def _embedding_keys(self, step: BlockStep) -> tuple[tuple, tuple]:
        """What a block-step's time embedding and text projection depend on: the step (its timestep and
        expert; for block 0 with a clean first frame also its frame count, one timestep per token), and
        the expert and the block's text mix."""
        plan = self.plan
        per_token = plan.window_frames(0) if plan.clean_first_frame and step.block == 0 else None
        expert = plan.expert(step.step)
        return ("time", step.step, expert, per_token), ("text", expert, plan.text_mix(step.block))

    def embeddings(self, step: BlockStep) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A block-step's temb, timestep_proj and projected text (`Conditioner.embed`), shared by the
        block-steps with the same step, expert and text mix instead of computed for each."""
        time_key, text_key = self._embedding_keys(step)
        temb, timestep_proj = self._embedding(time_key, step, self._embed_time, time_key)
        return temb, timestep_proj, self._embedding(text_key, step, self._embed_text, text_key, step.block)

    def _embedding(self, key: tuple, step: BlockStep, make, *args):
        value = self._embeddings.pop(key, None)
        if value is None:
            value = make(*args)
        if self._last_use[key] != step:
            self._embeddings[key] = value
        return value

    def _embed_time(self, key: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        _, step, expert, per_token = key
        plan, t = self.plan, self.timesteps[step]
        if per_token is None:
            return self.conditioners[expert].embed_time(t.expand(plan.batch), self.texts.dtype)
        # diffusers' expand_timesteps: one timestep per token, 0 on the clean first frame's tokens
        height, width = plan.patch_grid
        mask = torch.ones(per_token, height, width, device=self.device)
        mask[0] = 0
        timesteps = (mask * t).flatten().expand(plan.batch, -1)
        return self.conditioners[expert].embed_time(timesteps.flatten(), self.texts.dtype,
                                                    timestep_seq_len=timesteps.shape[1])

    def _embed_text(self, key: tuple, block: int) -> torch.Tensor:
        return self.conditioners[key[1]].embed_text(self.text(block), self.image)

    def __call__(self, step: BlockStep) -> WindowState:
        plan, timeline = self.plan, self.plan.timeline
        b, i = step.block, step.iteration
        expert = plan.expert(step.step)
        frames = plan.window_frames(b)
        height, width = plan.patch_grid
        temb, timestep_proj, text = self.embeddings(step)
        read_cache = timeline.has_cache(b, i)
        rope_frames = frames + (timeline.context if read_cache else 0)
        capture = None
        if b >= 1 and i - (b - 1) < timeline.num_steps and timeline.has_cache(b - 1, i):
            hw = height * width
            capture = (timeline.context * hw, 2 * timeline.context * hw)
        guidance = plan.guidance[expert] if plan.cfg else None
        return WindowState(
            block=b,
            grid=(frames, height, width),
            own_frames=timeline.block_len(b),
            guidance=guidance,
            temb=temb,
            timestep_proj=timestep_proj,
            text=text,
            rope=self.rotary(expert, rope_frames),
            cache=self.cache,
            read_cache=read_cache,
            capture=capture,
        )


# What a block scheduler's `step()` changes (UniPC: its step count and history; diffusers' flow-match
# Euler: its index): a block's scheduler is its fresh copy with these attributes set.
SCHEDULER_STATE = ("steps_taken", "model_outputs", "last_sample", "_step_index", "_begin_index")


class SchedulerStateError(RuntimeError):
    """A scheduler changed an attribute that SCHEDULER_STATE (so a checkpoint) does not hold."""


def scheduler_state(scheduler, fresh) -> dict:
    """The attributes of SCHEDULER_STATE that `scheduler` has; raises if anything else drifted from `fresh`."""
    for name, value in vars(scheduler).items():
        if name not in SCHEDULER_STATE and not _same(value, getattr(fresh, name, None)):
            raise SchedulerStateError(f"scheduler attribute {name} changed, not in SCHEDULER_STATE")
    return {name: getattr(scheduler, name) for name in SCHEDULER_STATE if hasattr(scheduler, name)}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a.cpu(), b.cpu())
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if type(a).__module__ == "numpy":
        return type(a) is type(b) and bool((a == b).all())
    return a is b or a == b


class BlockLatents:
    """The first stage's state: every block's latents and its own scheduler.

    `latents` is every block's initial noise, or the latents a checkpoint saved (then `states`
    holds the scheduler state of each block that had started; the others are fresh copies).
    `clip`: the timeline's prefix (a clip being continued), final, read as block 0's context.
    """

    def __init__(self, plan: GenerationPlan, latents: list[torch.Tensor], scheduler, device,
                 states: dict[int, dict] | None = None, condition: ImageCondition | None = None,
                 clip: torch.Tensor | None = None):
        self.plan = plan
        prefix = plan.timeline.prefix
        assert (clip.shape[2] if clip is not None else 0) == prefix, f"the plan continues a clip of {prefix} frame(s)"
        self.clip = None if clip is None else clip.to(device=device, dtype=torch.float32)
        self.latents = [n.to(device=device, dtype=torch.float32) for n in latents]
        # image-to-video: the condition channels of the whole video, or block 0's clean first frame
        self.channels = first_frame = None
        if condition is not None:
            if condition.channels is not None:
                self.channels = condition.channels.to(device=device, dtype=torch.float32)
            if condition.first_frame is not None:
                first_frame = condition.first_frame.to(device=device, dtype=torch.float32)
        assert (first_frame is not None) == plan.clean_first_frame, "a clean first frame needs its latent"
        self.first_frame = first_frame
        self._keep_first_frame()
        self.fresh = block_scheduler(scheduler)
        self.schedulers = [copy.deepcopy(self.fresh) for _ in latents]
        for block, state in (states or {}).items():
            for name, value in state.items():
                setattr(self.schedulers[block], name, value)

    def scheduler_states(self, iteration: int) -> dict[int, dict]:
        """State of the schedulers of the blocks in progress at the start of `iteration`.

        Blocks that have not started are fresh; blocks that are final take no more steps.
        """
        timeline = self.plan.timeline
        started = range(max(0, iteration - timeline.num_steps + 1), min(iteration, timeline.num_blocks))
        return {b: scheduler_state(self.schedulers[b], self.fresh) for b in started}

    def window(self, block: int) -> torch.Tensor:
        """Model input: the last c frames of block-1 (block 0: of the clip) as they stand, then the block's frames."""
        context = self.plan.timeline.context_len(block)
        if context == 0:
            window = self.latents[block]
        else:
            before = self.clip if block == 0 else self.latents[block - 1]
            window = torch.cat([before[:, :, -context:], self.latents[block]], dim=2)
        if self.channels is not None:  # the window's own slice of the mask and condition latents
            start, stop = self.plan.timeline.window_range(block)
            window = torch.cat([window, self.channels[:, :, start:stop]], dim=1)
        return window

    def step(self, block: int, step: int, pred: torch.Tensor) -> None:
        t = self.plan.timesteps[step]
        self.latents[block] = self.schedulers[block].step(pred, t, self.latents[block], return_dict=False)[0]
        if block == 0:
            self._keep_first_frame()

    def _keep_first_frame(self) -> None:
        """The image's latent in place of block 0's first frame, as diffusers' expand_timesteps path puts it
        in the model input and the final latents. The scheduler works element by element, so what it
        made of that frame touches no other frame."""
        if self.first_frame is not None:
            self.latents[0] = torch.cat([self.first_frame, self.latents[0][:, :, 1:]], dim=2)

    def block(self, block: int) -> torch.Tensor:
        return self.latents[block]

    def video(self) -> torch.Tensor:
        """The whole latent video: the clip (if any), then every block."""
        return torch.cat(([] if self.clip is None else [self.clip]) + self.latents, dim=2)


def batched_window(window: torch.Tensor, batch: int) -> torch.Tensor:
    return window.expand(batch, *window.shape[1:])


def run_reference(plan, experts, texts, noise, scheduler, device="cpu", on_block_done=None,
                  image: ImageCondition | None = None, clip: torch.Tensor | None = None) -> torch.Tensor:
    """Sequential DualParal: every block-step through every layer, in timeline order.

    `experts`: per expert, (Conditioner, [embed, block layers..., head]); `texts`: the plan's text
    embeddings stacked (num_texts, batch, L, text_dim); `image`: the job's image condition, if any;
    `clip`: the latents the timeline's prefix holds. Returns (1, C, F, h, w), clip included.
    """
    conditioners = [conditioner for conditioner, _ in experts]
    build = WindowBuilder(plan, conditioners, texts, device, None if image is None else image.embeds)
    latents = BlockLatents(plan, noise, scheduler, device, condition=image, clip=clip)
    with torch.no_grad():
        for step in plan.timeline.block_steps():
            state = build(step)
            state.latents = batched_window(latents.window(step.block), plan.batch)
            for layer in experts[plan.expert(step.step)][1]:
                state = layer(state)
            latents.step(step.block, step.step, state.pred)
            if on_block_done is not None and step.step == plan.timeline.num_steps - 1:
                on_block_done(step.block, latents.block(step.block))
    assert len(build.cache) == 0, "feature cache left unconsumed"
    return latents.video()
