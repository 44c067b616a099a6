"""One process's part of a generation run: its pipeline stage, the text encoder and the VAE.

`Generator` loads the model once (each rank only its stage's tensors) and then generates any number
of videos whose settings may differ per job (prompt, size, frames, steps, block size, ...); the
model-level settings (model, dtype, partition, stages, attention backend, LoRAs) are fixed at load.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, replace

import torch
from deepspeed.runtime.pipe.topology import ProcessTopology

from ..config import WAN22_BOUNDARY_RATIO, DualParalConfig
from ..wan.lora import tensors_read as lora_tensors_read
from ..wan.lora import with_loras
from ..wan.model import Conditioner, WanConfig, layer_specs
from ..wan.weights import FolderWeights, ModelFolder, RandomWeights, resolve_model
from . import comm
from .clip import job_timeline, load_clip
from .denoise import GenerationPlan, make_scheduler, run_reference
from .engine import DualParalEngine, GenerationRequest, StageStats
from .image import (
    DEFAULT_SPATIAL_FACTOR,
    ImageInput,
    encode_clip_tokens,
    encode_image,
    image_input,
    random_condition,
    random_weights_image,
    read_vae_config,
    spatial_factor,
)
from .noise import initial_noise
from .prompts import prompt_plan

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_plan(cfg: DualParalConfig, wan: WanConfig, scheduler, boundary_ratio: float | None, num_experts: int,
               spatial: int = DEFAULT_SPATIAL_FACTOR, image: ImageInput | None = None) -> GenerationPlan:
    """The rank-independent description of one generation; `spatial` is the VAE's spatial factor and
    `image` how the model takes the job's image (used only when the job has one)."""
    timeline = job_timeline(cfg)
    guidance = (cfg.guidance_scale, cfg.low_noise_guidance_scale)[:num_experts]
    prompts = prompt_plan(cfg, timeline)
    return GenerationPlan(
        timeline=timeline,
        timesteps=scheduler.timesteps.clone(),
        latent_height=cfg.height // spatial,
        latent_width=cfg.width // spatial,
        patch_size=wan.patch_size,
        guidance=guidance,
        boundary_timestep=None if boundary_ratio is None else boundary_ratio * 1000,
        num_texts=len(prompts.texts),
        text_mixes=prompts.mixes,
        image_tokens=image.clip_tokens if image is not None and cfg.image else 0,
        clean_first_frame=image is not None and bool(cfg.image) and image.mode == "first_frame",
    )


@dataclass
class Result:
    latents: torch.Tensor | None  # first stage only
    seconds: float
    stats: StageStats


class Generator:
    """This rank's stage of the DualParal pipeline (plus text encoder and VAE on a first stage).

    The process must already have joined the process group: `device` is what `comm.init_process`
    returned (starting it is the caller's decision, not a side effect of loading a model).
    """

    def __init__(self, cfg: DualParalConfig, device: torch.device, random_weights: list[WanConfig] | None = None):
        if not comm.is_started():
            raise RuntimeError("Generator needs the process group: call pipeline.comm.init_process first")
        self.cfg = cfg
        self.device = device
        self.rank, world_size = comm.world()
        stages, replicas = cfg.pipeline_topology(world_size)
        # pipe is the fastest axis: a replica's stages are consecutive ranks, i.e. on one node
        self.topology = ProcessTopology(axes=["data", "pipe"], dims=[replicas, stages])
        self.dtype = DTYPES[cfg.dtype]
        if random_weights is None:
            self.folder = ModelFolder(resolve_model(cfg.model))
            expert_configs = [WanConfig.from_json(f / "config.json") for f in self.folder.experts]
            weights = [FolderWeights(f, self.dtype, self.device) for f in self.folder.experts]
            self.boundary_ratio = self.folder.boundary_ratio
            self.spatial = spatial_factor(read_vae_config(self.folder.path))
            self.image_input = image_input(self.folder.path, expert_configs[0], self.folder.index)
        else:
            self.folder = None
            expert_configs = random_weights
            weights = [RandomWeights(cfg.seed + e, self.dtype, self.device) for e in range(len(random_weights))]
            self.boundary_ratio = WAN22_BOUNDARY_RATIO if len(random_weights) == 2 else None
            self.spatial, self.image_input = random_weights_image(random_weights[0])
        weights = with_loras(weights, expert_configs, cfg.loras)
        self.wan = expert_configs[0]
        self.num_experts = len(expert_configs)
        started = time.perf_counter()
        self.compile = cfg.compile if cfg.compile is not None else self.device.type == "cuda"
        self.engine = DualParalEngine(
            self.topology, expert_configs, weights, cfg.partition_method, self.device, self.dtype,
            cfg.attention_backend, self.compile, cfg.first_stage_vae_layers, comm_timeout_s=cfg.comm_timeout_s,
        )
        bases = [getattr(w, "base", w) for w in weights]  # under a LoRA's LoraWeights
        read = sum(w.safetensors.tensors_read for w in bases if isinstance(w, FolderWeights))
        parts = self.engine.modules[0].parts
        log.info(
            "rank %d: stage %d/%d of replica %d/%d loaded in %.1fs (%d weight tensors read; layers %d-%d)",
            self.rank, self.engine.stage, stages, self.engine.comm.replica, replicas, time.perf_counter() - started,
            read, parts[self.engine.stage], parts[self.engine.stage + 1] - 1,
        )
        if cfg.loras:
            log.info("rank %d: %d LoRAs fused (%d LoRA tensors read)", self.rank, len(cfg.loras), lora_tensors_read(weights))
        self._vae = None
        self._clip_tokens: dict[str, torch.Tensor] = {}  # image path -> CLIP tokens, from encode()
        # On CUDA the pipeline runs on a stream of the highest priority, as NCCL's streams do
        # (comm.init_process), so that the decode beside it (output/stream.py, the lowest priority)
        # yields to both. One stream for every generation: the allocator caches memory per stream.
        self._stream = None
        if device.type == "cuda":
            _, greatest = torch.cuda.Stream.priority_range()
            self._stream = torch.cuda.Stream(device, priority=greatest)

    @property
    def stage(self) -> int:
        return self.engine.stage

    @property
    def replica(self) -> int:
        return self.engine.comm.replica

    @property
    def num_replicas(self) -> int:
        return self.engine.comm.num_replicas

    @property
    def is_first(self) -> bool:
        return self.engine.is_first

    def scheduler(self, cfg: DualParalConfig):
        folder = self.folder.path / "scheduler" if self.folder else None
        return make_scheduler(cfg.scheduler, cfg.flow_shift, cfg.num_inference_steps, folder)

    def encode(self, cfgs: list[DualParalConfig]) -> list[torch.Tensor | None]:
        """Prompt embeddings of the given jobs, encoded here on a first stage (one encoder load, each
        distinct prompt once), else None. Per job: its distinct texts stacked (prompts.PromptPlan).
        A model that reads CLIP tokens gets each distinct image's here too, with one image encoder load."""
        if not self.is_first:
            return [None] * len(cfgs)
        from ..wan.text import encode_jobs

        texts = encode_jobs(self.folder.path, cfgs, self.device, self.dtype)
        if self.image_input is not None and self.image_input.clip_tokens:  # the image encoder, once for all jobs
            self._clip_tokens = encode_clip_tokens(self.folder.path, [c.image for c in cfgs if c.image], self.device,
                                                   self.dtype)
        return texts

    @property
    def vae(self):
        """The VAE on a first stage; with random weights, Wan2.1's VAE shape with seeded random values."""
        if self._vae is None:
            from diffusers import AutoencoderKLWan

            if self.folder is None:
                torch.manual_seed(self.cfg.seed)
                self._vae = AutoencoderKLWan().to(self.device, DTYPES[self.cfg.vae_dtype]).eval()
                return self._vae
            self._vae = AutoencoderKLWan.from_pretrained(self.folder.path / "vae", dtype=DTYPES[self.cfg.vae_dtype],
                                                         use_safetensors=True)
            self._vae.to(self.device).eval()
        return self._vae

    def request(self, cfg: DualParalConfig, text: torch.Tensor | None = None, **options) -> GenerationRequest:
        """The request of one video: its plan and scheduler, and on a first stage its initial noise.

        `text` (prompt embeddings) and `clip` (the latents of the clip it continues, among `options`)
        are needed on the first stage only; `options` are the other fields of `GenerationRequest`
        (checkpointing, hooks, timing).
        """
        scheduler = self.scheduler(cfg)
        plan = build_plan(cfg, self.wan, scheduler, self.boundary_ratio, self.num_experts, self.spatial,
                          self.image_input)
        noise = image = None
        if self.is_first:
            shape = (self.wan.out_channels, plan.latent_height, plan.latent_width)
            noise = initial_noise(plan.timeline, cfg.seed, shape, cfg.noise)
            if cfg.image and self.folder is None:  # random weights (benchmarks): a random condition
                image = random_condition(plan, self.image_input, self.wan, cfg.seed, self.dtype, self.device)
            elif cfg.image:
                image = encode_image(self.folder.path, self.image_input, cfg.image, self.vae, plan, self.spatial,
                                     self.device, self.dtype, self._clip_tokens.get(cfg.image))
        return GenerationRequest(plan, text, noise, scheduler, image=image, **options)

    def generate(self, request: GenerationRequest) -> Result:
        """Runs one video through the pipeline (collective over the replica's stages)."""
        text = self.engine.share_text(request.text, request.plan)
        image = self.engine.share_image(request.image, request.plan)
        started = time.perf_counter()
        with self._pipeline_stream():
            output = self.engine.generate(replace(request, text=text, image=image))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return Result(output.latents, time.perf_counter() - started, output.stats)

    @property
    def stream(self) -> torch.cuda.Stream | None:
        """The CUDA stream every generation's kernels run on (None on the CPU)."""
        return self._stream

    @contextlib.contextmanager
    def _pipeline_stream(self):
        """The generation's kernels on the pipeline's stream (on CUDA), after the work that made its inputs.

        The inputs made on the default stream (text, image, noise, a checkpoint's latents) are held by the
        request until the generation is over, so their memory is not reused while the pipeline's stream
        reads them; and the caller's stream waits for the pipeline's before it reads the outputs."""
        if self._stream is None:
            yield
            return
        caller = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(caller)
        try:
            with torch.cuda.stream(self._stream):
                yield
        finally:
            caller.wait_stream(self._stream)


def reference_latents(cfg: DualParalConfig, device="cpu") -> torch.Tensor:
    """The single-process oracle for `cfg`: same model, text, noise and schedulers, no pipeline."""
    folder = ModelFolder(resolve_model(cfg.model))
    dtype = DTYPES[cfg.dtype]
    experts = []
    configs = [WanConfig.from_json(expert / "config.json") for expert in folder.experts]
    sources = with_loras([FolderWeights(e, dtype, device) for e in folder.experts], configs, cfg.loras)
    for wan, weights in zip(configs, sources):
        layers = [spec.build() for spec in layer_specs(wan, weights, cfg.attention_backend)]
        experts.append((Conditioner(wan, weights).to(device), layers))
    from ..wan.text import encode_jobs

    [text] = encode_jobs(folder.path, [cfg], device, dtype)
    scheduler = make_scheduler(cfg.scheduler, cfg.flow_shift, cfg.num_inference_steps, folder.path / "scheduler")
    spatial, mode = spatial_factor(read_vae_config(folder.path)), image_input(folder.path, wan, folder.index)
    plan = build_plan(cfg, wan, scheduler, folder.boundary_ratio, len(experts), spatial, mode)
    shape = (wan.out_channels, plan.latent_height, plan.latent_width)
    noise = initial_noise(plan.timeline, cfg.seed, shape, cfg.noise)
    image = clip = None
    if cfg.image or cfg.continue_from is not None:
        from diffusers import AutoencoderKLWan

        vae = AutoencoderKLWan.from_pretrained(folder.path / "vae", dtype=DTYPES[cfg.vae_dtype], use_safetensors=True)
        vae = vae.to(device).eval()
        if cfg.image:
            image = encode_image(folder.path, mode, cfg.image, vae, plan, spatial, device, dtype)
        if cfg.continue_from is not None:
            clip = load_clip(cfg, vae, device).latents
    return run_reference(plan, experts, text.to(device), noise, scheduler, device, image=image, clip=clip)
