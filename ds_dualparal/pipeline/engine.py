"""The pipelined DualParal engine: one `PipelineModule` stage per rank, driven by `DualParalSchedule`.

The schedule decides what runs when; this engine only carries its instructions out, through an
instruction map that refuses anything it does not know. Send and receive instructions only queue
their transfer; the queued transfers of a tick go out as one batch before the next computation.

Overlap (`GenerationRequest.overlap`, on by default): a posted batch is not waited for at the end of
its tick; only the use of a received buffer waits (on CUDA the stream does, not the host), and the
first stage applies a returned prediction (its scheduler step) only when a window it loads, a block
it emits or a checkpoint needs it. A stage then runs its next block-step while the last tick's
transfers and its neighbour's work are still under way, instead of in lockstep with it. The values
are the same: each block's updates are applied in the same order, and every window sees the
latents the schedule gives it.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch
from deepspeed.pipe import PipelineModule
from deepspeed.runtime.pipe.topology import ProcessTopology

from ..config import TEXT_TOKENS
from ..wan.model import Conditioner, WanBlockLayer, WanConfig, WeightSource, layer_specs
from . import schedule as sched
from .comm import PipeComm, Transfers
from .denoise import BlockLatents, GenerationPlan, WindowBuilder, batched_window
from .image import ImageCondition
from .overlap import DeferredUpdates
from .partition import stage_bounds
from .timeline import BlockStep

if TYPE_CHECKING:
    from ..output.checkpoint import Resume

log = logging.getLogger(__name__)

_TRANSFERS = (sched.SendActivation, sched.SendPrediction, sched.RecvActivation, sched.RecvPrediction)


@dataclass
class StageStats:
    """What one generation did on this stage; returned with its latents."""

    block_steps: int = 0
    bytes_sent: int = 0
    # (start, end) CUDA events around each ForwardLayers, when the request asks for timing
    forward_events: list = field(default_factory=list)

    def busy_seconds(self) -> float:
        return sum(start.elapsed_time(end) for start, end in self.forward_events) / 1000.0


@dataclass
class Checkpointing:
    """Checkpoint and resume of one generation (see checkpoint.py)."""

    start: int = 0  # the first iteration to run, on every stage
    every: int | None = None  # first stage: a SaveCheckpoint at every multiple of `every`
    resume: Resume | None = None  # first stage, start > 0: the latents and scheduler states at `start`
    save: Callable[[int, BlockLatents], object] | None = None  # first stage: save(iteration, latents)


@dataclass
class GenerationRequest:
    """One generation, as every stage of a replica runs it.

    `plan` and `checkpointing.start` are the same on every stage; `text` (the plan's distinct prompt
    embeddings, stacked: (plan.num_texts, batch, TEXT_TOKENS, text_dim)), `noise`, `scheduler`, the
    hooks and the rest of `checkpointing` are read on the first stage only, where
    `on_step()` follows each scheduler step and `on_block_done(block, latents)` each finished block.
    """

    plan: GenerationPlan
    text: torch.Tensor | None = None
    noise: list[torch.Tensor] | None = None
    scheduler: object | None = None
    clip: torch.Tensor | None = None  # first stage: the latents of the clip continued (the timeline's prefix)
    checkpointing: Checkpointing = field(default_factory=Checkpointing)
    on_step: Callable[[], object] | None = None
    on_block_done: Callable[[int, torch.Tensor], object] | None = None
    image: ImageCondition | None = None  # image-to-video: the first stage's; every stage's embeds once shared
    timing: bool = False  # record CUDA events around every ForwardLayers (benchmarks)
    overlap: bool = True  # False: wait for each tick's transfers at its end (lockstep; benchmarks compare)


@dataclass
class GenerationOutput:
    latents: torch.Tensor | None  # (1, C, F, h, w) on the first stage, None on the others
    stats: StageStats


FAULT_VARIABLE = "DS_DUALPARAL_FAULT"


@dataclass(frozen=True)
class InjectedFault:
    """Test hook: ``DS_DUALPARAL_FAULT="rank=R,tick=T[,action=raise|kill|hang|stop]"`` makes rank R, at the
    start of tick T of each generation, raise an error (default), SIGKILL itself, stop responding or
    SIGSTOP itself.
    The fault tests use it to check that one failing rank ends the whole run; nothing else reads it.
    """

    tick: int
    action: str

    @classmethod
    def from_environment(cls, rank: int) -> InjectedFault | None:
        spec = os.environ.get(FAULT_VARIABLE)
        if not spec:
            return None
        match = re.fullmatch(r"rank=(\d+),tick=(\d+)(?:,action=(raise|kill|hang|stop))?", spec)
        if match is None:
            raise ValueError(f"{FAULT_VARIABLE}={spec!r}: expected rank=R,tick=T[,action=raise|kill|hang|stop]")
        return cls(int(match[2]), match[3] or "raise") if int(match[1]) == rank else None

    def at(self, tick: int) -> None:
        if tick != self.tick:
            return
        log.warning("%s: %s at tick %d", FAULT_VARIABLE, self.action, tick)
        if self.action in ("kill", "stop"):
            os.kill(os.getpid(), signal.SIGKILL if self.action == "kill" else signal.SIGSTOP)
        while self.action == "hang":
            time.sleep(60)
        raise RuntimeError(f"fault injected by {FAULT_VARIABLE} at tick {tick}")


class StagePipeline(PipelineModule):
    """This rank's slice of one expert: DeepSpeed's `PipelineModule` over the expert's `LayerSpec`s (only
    this stage's are built, so a rank reads only its own tensors), split at `bounds`.

    The bounds come from `partition.stage_bounds` (DeepSpeed's own partition functions), which can also
    give the first stage less work for the decoding it does beside its layers; DeepSpeed has no public
    way to pass them in, so `_partition_layers` is overridden — the contract it relies on (the hook is
    called once from `__init__`, `_set_bounds` takes the stage's layer range, `parts` holds the bounds,
    `forward` runs the built layers in order) is pinned by tests/test_partition.py.
    """

    def __init__(self, specs: list, topology: ProcessTopology, bounds: list[int]):
        self._bounds = bounds
        super().__init__(layers=specs, topology=topology, partition_method="uniform")

    def _partition_layers(self, method="uniform"):
        self.parts = list(self._bounds)
        self._set_bounds(start=self.parts[self.stage_id], stop=self.parts[self.stage_id + 1])


class DualParalEngine:
    """Holds this rank's slice of every expert and runs generations through the pipeline."""

    def __init__(
        self,
        topology: ProcessTopology,
        expert_configs: list[WanConfig],
        expert_weights: list[WeightSource],
        partition_method: str,
        device: torch.device,
        dtype: torch.dtype,
        attention_backend: str | None = None,
        compile: bool = False,
        first_stage_vae_layers: float = 0.0,
        *,
        comm_timeout_s: int,
    ):
        self.comm = PipeComm(topology, comm_timeout_s)
        if compile:  # one compiled graph per window shape; a run sees a handful (cache on/off, capture, block 0)
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self.device = device
        self.config = expert_configs[0]
        self.modules = []
        for cfg, weights in zip(expert_configs, expert_weights):
            specs = layer_specs(cfg, weights, attention_backend, compile)
            bounds = stage_bounds([spec.typename.__name__ for spec in specs], partition_method,
                                  self.comm.num_stages, first_stage_vae_layers)
            self.modules.append(StagePipeline(specs, topology, bounds).to(device).eval())
        self.conditioners = [Conditioner(cfg, w).to(device) for cfg, w in zip(expert_configs, expert_weights)]
        self.dtype = dtype

    def set_attention_backend(self, backend: str | None) -> None:
        for module in self.modules:
            for layer in module.modules():
                if isinstance(layer, WanBlockLayer):
                    layer.set_attention_backend(backend)

    @property
    def stage(self) -> int:
        return self.comm.stage

    @property
    def is_first(self) -> bool:
        return self.comm.is_first

    def share_text(self, text: torch.Tensor | None, plan: GenerationPlan) -> torch.Tensor:
        """The job's prompt embeddings, encoded on the first stage, on every stage of the replica: one
        broadcast of the stacked distinct texts (the plan, which says how many, every stage has)."""
        shape = (plan.num_texts, plan.batch, TEXT_TOKENS, self.config.text_dim)
        if not self.is_first:
            text = torch.empty(shape, dtype=self.dtype, device=self.device)
        assert tuple(text.shape) == shape, f"text embeddings of shape {tuple(text.shape)}, the plan needs {shape}"
        return self.comm.broadcast_from_first(text.to(self.device, self.dtype).contiguous())

    def share_image(self, image: ImageCondition | None, plan: GenerationPlan) -> ImageCondition | None:
        """The job's image condition, with its CLIP tokens (encoded on the first stage) on every stage of
        the replica: one broadcast, when the plan has image tokens. The rest stays on the first stage."""
        if not plan.image_tokens:
            return image
        shape = (1, plan.image_tokens, self.config.image_dim)
        if not self.is_first:
            image = ImageCondition(embeds=torch.empty(shape, dtype=self.dtype, device=self.device))
        assert tuple(image.embeds.shape) == shape, f"image tokens {tuple(image.embeds.shape)}, the plan needs {shape}"
        embeds = self.comm.broadcast_from_first(image.embeds.to(self.device, self.dtype).contiguous())
        return ImageCondition(embeds, image.channels, image.first_frame)

    def generate(self, request: GenerationRequest) -> GenerationOutput:
        """Runs one generation; `request.text` (and `request.image`'s tokens) must already be on every
        stage (`share_text`, `share_image`)."""
        run = _Run(self, request)
        checkpointing = request.checkpointing
        schedule = sched.DualParalSchedule(request.plan.timeline, self.comm.num_stages, self.stage,
                                           checkpointing.start, checkpointing.every)
        fault = InjectedFault.from_environment(self.comm.rank)
        with torch.no_grad():
            for tick, instructions in enumerate(schedule.steps()):
                if fault is not None:
                    fault.at(tick)
                for instruction in instructions:
                    run.execute(instruction)
                run.transfer()
            run.finish()
        return GenerationOutput(run.latents.video() if self.is_first else None, run.stats)


class _Run:
    """The state of one generation on one stage, and the method for each instruction."""

    def __init__(self, engine: DualParalEngine, request: GenerationRequest):
        self.engine = engine
        self.request = request
        self.plan = plan = request.plan
        image = request.image
        self.build = WindowBuilder(plan, engine.conditioners, request.text, engine.device,
                                   None if image is None else image.embeds)
        self.stats = StageStats()
        self.latents = None
        if engine.is_first:
            resume = request.checkpointing.resume
            if (resume is None) != (request.checkpointing.start == 0):
                raise ValueError("a resumed run starts from a checkpoint's state: give both or neither")
            if resume is None:
                self.latents = BlockLatents(plan, request.noise, request.scheduler, engine.device, condition=image,
                                            clip=request.clip)
            else:
                self.latents = BlockLatents(plan, resume.latents, request.scheduler, engine.device, resume.schedulers,
                                            condition=image, clip=request.clip)
        self.states = {}
        self.predictions = {}
        self.sends: list[tuple[torch.Tensor, int]] = []
        self.recvs: list[tuple[torch.Tensor, int, object]] = []
        self.arrivals: dict[tuple[int, int], Transfers] = {}  # received, not yet waited for
        self.in_flight: list[Transfers] = []  # posted batches, until done
        self.updates = DeferredUpdates(request.overlap)  # first stage: scheduler steps not yet applied

    def execute(self, instruction) -> None:
        handler = self._INSTRUCTION_MAP.get(type(instruction))
        if handler is None:
            raise RuntimeError(f"{type(self.engine).__name__} does not know instruction {instruction!r}")
        if not isinstance(instruction, _TRANSFERS):
            self.transfer()
        handler(self, instruction)

    def transfer(self) -> None:
        """Sends and receives queued since the last computation, as one batch."""
        if not self.sends and not self.recvs:
            return
        batch = self.engine.comm.post(self.sends, [(buffer, stage) for buffer, stage, _ in self.recvs])
        if self.request.overlap:
            self.in_flight = [posted for posted in self.in_flight if not posted.done()] + [batch]
        else:
            batch.wait()
        self.stats.bytes_sent += sum(t.numel() * t.element_size() for t, _ in self.sends)
        for buffer, _, instruction in self.recvs:
            key = (instruction.block, instruction.step)
            if self.request.overlap:
                self.arrivals[key] = batch
            if isinstance(instruction, sched.RecvActivation):
                state = self.build(self._block_step(instruction))
                state.hidden = buffer
                self.states[key] = state
            else:
                self.predictions[key] = buffer
        self.sends, self.recvs = [], []

    def _arrived(self, key: tuple[int, int]) -> None:
        """Waits for the batch that brings block-step `key`'s received buffer, if it has not yet."""
        batch = self.arrivals.pop(key, None)
        if batch is not None:
            batch.wait()

    def _block_step(self, instruction) -> BlockStep:
        return BlockStep(instruction.block + instruction.step, instruction.block, instruction.step)

    def _buffer(self, shape) -> torch.Tensor:
        return torch.empty(shape, dtype=self.engine.dtype, device=self.engine.device)

    def load_window(self, instruction) -> None:
        step = self._block_step(instruction)
        self._apply_updates([(block, iteration - block) for block, iteration in
                             self.plan.timeline.dependencies(step.block, step.iteration)])
        state = self.build(step)
        state.latents = batched_window(self.latents.window(instruction.block), self.plan.batch)
        self.states[(instruction.block, instruction.step)] = state

    def recv_activation(self, instruction) -> None:
        shape = self.plan.hidden_shape(instruction.block, self.engine.config.inner_dim)
        self.recvs.append((self._buffer(shape), self.engine.stage - 1, instruction))

    def forward_layers(self, instruction) -> None:
        key = (instruction.block, instruction.step)
        self._arrived(key)
        module = self.engine.modules[self.plan.expert(instruction.step)]
        if self.request.timing:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self.states[key] = module(self.states[key])
            end.record()
            self.stats.forward_events.append((start, end))
        else:
            self.states[key] = module(self.states[key])
        self.stats.block_steps += 1

    def send_activation(self, instruction) -> None:
        state = self.states.pop((instruction.block, instruction.step))
        self.sends.append((state.hidden, self.engine.stage + 1))

    def send_prediction(self, instruction) -> None:
        state = self.states.pop((instruction.block, instruction.step))
        self.sends.append((state.pred, 0))

    def recv_prediction(self, instruction) -> None:
        shape = self.plan.prediction_shape(instruction.block, self.engine.config.out_channels)
        self.recvs.append((self._buffer(shape), self.engine.comm.num_stages - 1, instruction))

    def scheduler_step(self, instruction) -> None:
        key = (instruction.block, instruction.step)
        self._apply(self.updates.schedule(key, returned=key in self.predictions))

    def _apply_updates(self, needed: list[tuple[int, int]] | None = None) -> None:
        """Applies the pending scheduler steps in order: all of them, or until those `needed` are."""
        self._apply(self.updates.due(needed))

    def _apply(self, keys: list[tuple[int, int]]) -> None:
        for key in keys:
            if key in self.predictions:
                self._arrived(key)
                pred = self.predictions.pop(key)
            else:
                pred = self.states.pop(key).pred
            self.latents.step(*key, pred)
            if self.request.on_step is not None:
                self.request.on_step()

    def emit_block(self, instruction) -> None:
        self._apply_updates()
        if self.request.on_block_done is not None:
            self.request.on_block_done(instruction.block, self.latents.block(instruction.block))

    def save_checkpoint(self, instruction) -> None:
        self._apply_updates()
        save = self.request.checkpointing.save
        if save is not None:
            save(instruction.iteration, self.latents)

    def finish(self) -> None:
        if self.latents is not None:
            self._apply_updates()
        for batch in self.in_flight:
            batch.wait()
        self.in_flight = []
        if self.states or self.predictions or self.arrivals or len(self.updates):
            raise RuntimeError("the schedule left work undone")
        if len(self.build.cache):
            raise RuntimeError("the schedule left the feature cache unconsumed")

    _INSTRUCTION_MAP = {
        sched.LoadWindow: load_window,
        sched.RecvActivation: recv_activation,
        sched.ForwardLayers: forward_layers,
        sched.SendActivation: send_activation,
        sched.SendPrediction: send_prediction,
        sched.RecvPrediction: recv_prediction,
        sched.SchedulerStep: scheduler_step,
        sched.EmitBlock: emit_block,
        sched.SaveCheckpoint: save_checkpoint,
    }
