"""Benchmark DualParal on full-size Wan shapes with random weights (no download), side by side.

    python launch/bench.py --gpus 1,2 --baseline --out bench.jsonl

The driver starts one DeepSpeed launch per GPU count (each runs every case with the model loaded
once) and, with --baseline, diffusers' WanPipeline (with --image WanImageToVideoPipeline) on the full
sequence on one GPU; each worker appends JSON lines to --out; the driver prints one table. Warm-up runs
are excluded; times are medians of --repeats.

    python launch/bench.py --gpus 1 --baseline --shape i2v-14b --image --cases i2v:21:10 --repeats 1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ds_dualparal.files import free_port  # noqa: E402  (after the path: the script runs from a checkout)

PEAK_TFLOPS = 790.0  # bf16 matrix rate measured on one H200 (see BENCHMARKS.md)
SHAPES = {
    "1.3b": dict(num_layers=30, num_attention_heads=12, attention_head_dim=128, ffn_dim=8960),
    "14b": dict(num_layers=40, num_attention_heads=40, attention_head_dim=128, ffn_dim=13824),
    # image-to-video (--image): Wan2.1-I2V-14B (36 channels in, CLIP tokens) and Wan2.2-TI2V-5B (48 channels)
    "i2v-14b": dict(num_layers=40, num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, in_channels=36,
                    image_dim=1280, added_kv_proj_dim=5120),
    "ti2v-5b": dict(num_layers=30, num_attention_heads=24, attention_head_dim=128, ffn_dim=14336, in_channels=48,
                    out_channels=48),
    # CPU smoke test of the script itself
    "debug": dict(num_layers=3, num_attention_heads=2, attention_head_dim=12, ffn_dim=64, text_dim=32, freq_dim=32),
    "debug-i2v": dict(num_layers=3, num_attention_heads=2, attention_head_dim=12, ffn_dim=64, text_dim=32, freq_dim=32,
                      in_channels=36, image_dim=16, added_kv_proj_dim=24),
    "debug-ti2v": dict(num_layers=3, num_attention_heads=2, attention_head_dim=12, ffn_dim=64, text_dim=32, freq_dim=32,
                       in_channels=48, out_channels=48),
}


def parse_cases(text: str) -> list[dict]:
    """'label:frames:steps[:backend][:height x width]' items separated by commas."""
    cases = []
    for item in text.split(","):
        parts = item.split(":")
        case = dict(label=parts[0], latent_frames=int(parts[1]), steps=int(parts[2]))
        if len(parts) > 3 and parts[3]:
            case["backend"] = parts[3]
        if len(parts) > 4:
            h, w = parts[4].split("x")
            case["height"], case["width"] = int(h), int(w)
        cases.append(case)
    return cases


def _append(out: Path, record: dict) -> None:
    with open(out, "a") as f:
        f.write(json.dumps(record) + "\n")


def worker(args) -> int:
    import torch

    from ds_dualparal.config import DualParalConfig
    from ds_dualparal.pipeline import comm
    from ds_dualparal.pipeline.clip import job_timeline
    from ds_dualparal.pipeline.generation import Generator
    from ds_dualparal.pipeline.planner import Costs, simulate, simulate_ticks
    from ds_dualparal.pipeline.schedule import tick_table
    from ds_dualparal.wan.flops import block_step_flops
    from ds_dualparal.wan.model import WanConfig

    wan = WanConfig(**SHAPES[args.shape])
    cases = parse_cases(args.cases)
    first = cases[0]
    base = DualParalConfig(
        height=args.height, width=args.width, num_frames=4 * (first["latent_frames"] - 1) + 1,
        num_inference_steps=first["steps"], block_size=args.block_size, context=args.context,
        dtype="bfloat16", guidance_scale=args.guidance, scheduler=args.scheduler, attention_backend=args.backend,
        compile=args.compile,
        vae_dtype=args.vae_dtype, first_stage_vae_layers=args.first_stage_vae_layers,
        # random weights take a random image condition of the shape's kind; the path is not read
        image="random" if args.image else None,
    )
    started = time.perf_counter()
    # random weights are drawn on the device, tensor by tensor (wan.weights.RandomWeights): nothing on the CPU
    generator = Generator(base, comm.init_process(base.comm_timeout_s), random_weights=[wan])
    load_seconds = time.perf_counter() - started
    device = generator.device
    rank0 = generator.rank == 0
    cuda = device.type == "cuda"
    if rank0:
        print(f"worker: {args.shape} loaded in {load_seconds:.1f}s on {device}", file=sys.stderr, flush=True)
    overlaps = [True, False] if args.lockstep else [True]
    runs = [(case, segments, overlap) for case in cases for segments in args.segments for overlap in overlaps]
    warmed = {}  # shape key (below) -> warm-up seconds
    for case, segments, overlap in runs:
        cfg = base.with_overrides(
            num_frames=4 * (case["latent_frames"] - 1) + 1, num_inference_steps=case["steps"],
            height=case.get("height", args.height), width=case.get("width", args.width),
            **prompt_schedule(segments, 4 * (case["latent_frames"] - 1) + 1, args.transition),
        )
        text = random_texts(cfg, wan.text_dim, device) if generator.is_first else None
        backend = case.get("backend", args.backend)
        generator.engine.set_attention_backend(backend)
        tl = job_timeline(cfg)
        # what the compiled graphs and kernels depend on: the windows' sizes and whether blocks share a cache
        shape_key = (cfg.height, cfg.width, backend, tl.num_blocks > 1,
                     frozenset(stop - start for start, stop in map(tl.window_range, range(tl.num_blocks))))
        if shape_key not in warmed:  # later runs of the same shapes reuse the warm-up's
            # 3 steps: a block-step that both reads the cache and leaves one for its neighbour occurs
            # (each such window variant is compiled once); a video of one block has one variant: 1 step
            steps = 3 if tl.num_blocks > 1 else 1
            warmup = cfg.with_overrides(num_inference_steps=min(steps, cfg.num_inference_steps))
            warmup_start = time.perf_counter()
            generator.generate(generator.request(warmup, text))
            warmed[shape_key] = time.perf_counter() - warmup_start
            if rank0:
                print(f"worker: {case['label']} warmed up (compiling) in {warmed[shape_key]:.1f}s",
                      file=sys.stderr, flush=True)
        graphs = compiled_graphs()
        times, busy = [], []
        for _ in range(args.repeats):
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            comm.barrier()
            request = generator.request(cfg, text, timing=cuda, overlap=overlap)
            result = generator.generate(request)
            times.append(result.seconds)
            busy.append(result.stats.busy_seconds() if cuda else 0.0)
        stats = comm.gather_objects(dict(
            peak=torch.cuda.max_memory_allocated(device) if cuda else 0, busy=statistics.median(busy),
            sent=result.stats.bytes_sent, graphs=compiled_graphs() - graphs,
        ))
        if args.profile and cuda:
            profile_run(generator, generator.request(cfg, text, overlap=overlap), Path(args.profile),
                        f"{case['label']}-{segments}seg-{'overlap' if overlap else 'lockstep'}")
        digest = hashlib.sha256(result.latents.float().cpu().numpy().tobytes()).hexdigest()[:16] if rank0 else None
        # the command's path once per case: overlapped (the default), the first segment count given
        real_run = args.real_path and overlap and segments == args.segments[0]
        real = None
        if real_run:  # one real path per --decode mode; the first one's numbers are the row's
            reals = [real_path(generator, cfg, args.shape, args.repeats, mode) for mode in args.decode]
            real = dict(reals[0], other_decodes=reals[1:])
        if not rank0:
            continue
        plan = request.plan
        tl = plan.timeline
        flops = sum(
            block_step_flops(wan, plan.window_frames(b) * plan.tokens_per_frame(), tl.context * plan.tokens_per_frame() * tl.has_cache(b, b + s), plan.batch, plan.image_tokens)
            for b in range(tl.num_blocks) for s in range(tl.num_steps)
        )
        seconds = statistics.median(times)
        stages = generator.topology.get_dim("pipe")
        # the planner's lockstep simulation with each stage's measured busy time per block-step
        block_steps = tl.num_blocks * tl.num_steps
        costs = Costs([s["busy"] / block_steps for s in stats[:stages]]) if cuda else None
        planner_s = None
        if cuda:  # as this run went: overlapped (the default) or in lockstep ticks
            planner_s = (simulate(tl, stages, costs, overlap=True) if overlap else simulate_ticks(tl, stages, costs)).total_seconds
        ticks = tick_table(tl, stages)[-1][-1] + 1
        record = dict(
            kind="dualparal", label=case["label"], shape=args.shape, image=args.image, gpus=stages, latent_frames=case["latent_frames"],
            segments=segments, prompt_transition=cfg.prompt_transition, overlap=overlap,
            height=cfg.height, width=cfg.width, steps=cfg.num_inference_steps, blocks=tl.num_blocks,
            block_size=tl.block_size, context=tl.context, backend=case.get("backend", args.backend) or "default",
            seconds=seconds, times=times, block_steps_per_s=tl.num_blocks * tl.num_steps / seconds,
            seconds_per_step=seconds / tl.num_steps, peak_gib=[s["peak"] / 2**30 for s in stats],
            mfu=flops / seconds / (PEAK_TFLOPS * 1e12 * stages), tflop=flops / 1e12,
            bubble=1.0 - sum(s["busy"] for s in stats[:stages]) / (stages * seconds) if cuda else None,
            bytes_sent=sum(s["sent"] for s in stats), load_seconds=load_seconds, compile=generator.compile,
            partition=[int(p) for p in generator.engine.modules[0].parts], latents_sha256=digest,
            planner_s=planner_s, ticks=ticks,
            tick_overhead_s=(seconds - planner_s) / ticks if cuda else None,
            warmup_seconds=warmed[shape_key],
            # graphs torch.compile made during the timed runs, all ranks (0: the warm-up compiled them all)
            graphs_compiled_in_timing=sum(s["graphs"] for s in stats),
        )
        if real is not None:
            record.update(real)
        _append(Path(args.out), record)
        print(json.dumps(record), flush=True)
    comm.shutdown()
    return 0


def compiled_graphs() -> int:
    """Graphs torch.compile has made in this process so far."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def profile_run(generator, request, folder: Path, label: str) -> None:
    """One more run under torch.profiler; each rank writes its kernel table (by GPU time) and its host
    synchronisations (by count) to FOLDER/LABEL-rankR.txt, for the per-tick overhead."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from ds_dualparal.pipeline import comm

    comm.barrier()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        result = generator.generate(request)
        torch.cuda.synchronize()
    averages = prof.key_averages()
    syncs = [e for e in averages if any(k in e.key for k in ("Synchronize", "Memcpy", "item", "local_scalar", "nccl", "wait"))]
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{label}-rank{generator.rank}.txt", "w") as f:
        f.write(f"seconds {result.seconds:.3f} busy {result.stats.busy_seconds():.3f}\n")
        f.write(averages.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=60))
        f.write("\nhost synchronisations and transfers:\n")
        for e in sorted(syncs, key=lambda e: -e.count):
            f.write(f"{e.count:8d} calls  cpu {e.cpu_time_total / 1e3:9.1f} ms  cuda {e.device_time_total / 1e3:9.1f} ms  {e.key}\n")


def prompt_schedule(segments: int, num_frames: int, transition: int) -> dict:
    """Config overrides for a prompt schedule of `segments` equal parts (none for 1: a plain prompt)."""
    if segments == 1:
        return {}
    starts = [num_frames * k // segments for k in range(segments)]
    prompts = [dict(from_frame=start, prompt=f"segment {k}") for k, start in enumerate(starts)]
    return dict(prompts=prompts, prompt_transition=transition)


def random_texts(cfg, text_dim: int, device):
    """Random embeddings of the job's distinct texts, stacked as the engine takes them:
    (texts, cond/uncond, tokens, dim)."""
    import torch

    from ds_dualparal.config import TEXT_TOKENS
    from ds_dualparal.pipeline.prompts import prompt_plan

    texts = len(prompt_plan(cfg).texts)
    batch = 2 if cfg.do_classifier_free_guidance else 1
    noise = torch.Generator().manual_seed(0)
    return torch.randn((texts, batch, TEXT_TOKENS, text_dim), generator=noise).to(device, torch.bfloat16)


class RandomTextEncoder:
    """UMT5 of the real model's size (Wan: UMT5-XXL encoder) with random weights, through the same
    `encode_prompt` the CLI uses; the embedded tiny tokenizer stands in for the real one."""

    def __init__(self, shape: str, device):
        import torch
        from diffusers import WanPipeline
        from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

        from ds_dualparal.wan.weights import TINY_WAN_PATH

        if shape.startswith("debug"):
            config = UMT5Config(vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
        else:
            config = UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                                feed_forward_proj="gated-gelu")
        with torch.device(device):
            encoder = UMT5EncoderModel(config).to(torch.bfloat16).eval()
        tokenizer = AutoTokenizer.from_pretrained(TINY_WAN_PATH / "tokenizer")
        self.pipe = WanPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=None, scheduler=None)
        self.device = device

    def __call__(self, cfg):
        """The stack of the job's distinct texts, each (cond, uncond)."""
        import torch

        from ds_dualparal.config import TEXT_TOKENS
        from ds_dualparal.pipeline.prompts import prompt_plan

        stack = []
        with torch.no_grad():
            for prompt, negative in prompt_plan(cfg).texts:
                cond, uncond = self.pipe.encode_prompt(
                    prompt=prompt, negative_prompt=negative, do_classifier_free_guidance=True,
                    max_sequence_length=TEXT_TOKENS, device=self.device, dtype=torch.bfloat16)
                stack.append(torch.cat([cond, uncond]))
        return torch.stack(stack)


def real_path(generator, cfg, shape: str, repeats: int, decode: str = "auto") -> dict:
    """The command's path after loading: text encoding (the encoder is then freed, as the CLI does),
    the pipeline with every finished block decoded by the VAE beside it and its frames converted for
    the writer (a null sink: no ffmpeg on the GPU machine). Median of `repeats` runs after one
    warm-up; peak memory of the generation (after the encoder is freed). `decode`: where a single stage
    decodes ("auto": as the command, "inline" between block-steps, "beside": on a stream of its own)."""
    import torch

    from ds_dualparal.cli.runner import generate_streaming
    from ds_dualparal.pipeline import comm

    device = generator.device
    cuda = device.type == "cuda"

    def once():
        encoder = RandomTextEncoder(shape, device) if generator.is_first else None
        comm.barrier()
        started = time.perf_counter()
        text = encoder(cfg) if generator.is_first else None
        if cuda:
            torch.cuda.synchronize(device)
        encoded = time.perf_counter()
        del encoder
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        comm.barrier()
        encoded, restarted = encoded - started, time.perf_counter()
        request = generator.request(cfg, text)
        if generator.is_first:
            generate_streaming(generator, request, [lambda frames, first: None],
                               decode_inline={"auto": None, "inline": True, "beside": False}[decode])
        else:
            generator.generate(request)
        if cuda:
            torch.cuda.synchronize(device)
        return encoded, time.perf_counter() - restarted

    once()
    runs = [once() for _ in range(repeats)]
    stats = comm.gather_objects(dict(
        peak=torch.cuda.max_memory_allocated(device) if cuda else 0,
        runs=runs,
    ))
    first = stats[0]["runs"]
    encode = statistics.median(r[0] for r in first)
    generate = statistics.median(r[1] for r in first)
    return dict(real_encode_s=encode, real_generate_s=generate, real_total_s=encode + generate,
                real_runs=first, real_peak_gib=[s["peak"] / 2**30 for s in stats], vae_dtype=cfg.vae_dtype, decode=decode)


def shape_image(shape: str):
    """(VAE spatial factor, ImageInput or None) of a SHAPES entry, as the worker's random weights take
    it (pipeline.image.random_weights_image), without importing torch (the driver checks flags with it)."""
    from types import SimpleNamespace

    from ds_dualparal.pipeline.image import random_weights_image

    return random_weights_image(SimpleNamespace(**{"in_channels": 16, "out_channels": 16, "image_dim": None,
                                                   **SHAPES[shape]}))


# The image baseline's random VAE (it makes the condition latents, outside the timing): Wan2.1's
# (diffusers' defaults) for 8x shapes, Wan2.2-TI2V-5B's vae/config.json for 16x ones (latent statistics
# 0 and 1: the weights are random anyway); the debug shapes take a tiny one of the same kind.
WAN22_VAE = dict(base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                 in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16, is_residual=True,
                 latents_mean=[0.0] * 48, latents_std=[1.0] * 48)
DEBUG_VAE = dict(base_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1)
BASELINE_NOTE = ("diffusers rows with --image: WanImageToVideoPipeline; the image condition is made before the "
                 "timing (random CLIP tokens, as DualParal's; condition latents by the pipeline's own prepare_latents, "
                 "its VAE encode, with a random VAE of the model's kind, which then leaves the GPU): time and peak are "
                 "the denoising loop's")


def as_loaded(model, dtype):
    """`model` cast as diffusers' from_pretrained(torch_dtype=dtype) leaves it: tensors under a module
    named in its `_keep_in_fp32_modules` (Wan: RoPE, time embedder, norms, scale-shift tables) stay as
    built (fp32); one tensor at a time, so the fp32 copies go as they are cast."""
    keep = set(model._keep_in_fp32_modules or ())
    for prefix, module in model.named_modules():
        for key, param in module.named_parameters(recurse=False):
            if not keep.intersection(f"{prefix}.{key}".split(".")):
                param.data = param.data.to(dtype)
        for key, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point() and not keep.intersection(f"{prefix}.{key}".split(".")):
                module._buffers[key] = buffer.to(dtype)
    return model.eval()


def random_vae(shape: str, spatial: int, device, dtype):
    """A seeded random AutoencoderKLWan of the shape's kind, built on `device`."""
    import torch
    from diffusers import AutoencoderKLWan

    config = dict(WAN22_VAE) if spatial == 16 else {}
    if shape.startswith("debug"):
        config.update(DEBUG_VAE, **({"decoder_base_dim": 12} if spatial == 16 else {}))
    torch.manual_seed(0)
    with torch.device(device):
        return as_loaded(AutoencoderKLWan(**config), dtype)


def image_pipeline(transformer, vae, scheduler, embeds, expand_timesteps: bool):
    """diffusers' WanImageToVideoPipeline whose image condition is given: `encode_image` returns `embeds`
    (CLIP tokens, None for a model without them) and `prepare_latents` runs the pipeline's own code (the
    VAE encode of the image) once, on the first call after `condition` is reset to None; later calls
    reuse its tensors, so that a call after that is the denoising loop."""
    from diffusers import WanImageToVideoPipeline

    class GivenImagePipeline(WanImageToVideoPipeline):
        condition = None

        @property
        def _execution_device(self):  # the transformer's, also while the VAE waits on the CPU
            return self.transformer.device

        def encode_image(self, image, device=None):
            return embeds

        def prepare_latents(self, *args, **kwargs):
            if self.condition is None:
                self.condition = super().prepare_latents(*args, **kwargs)
            return tuple(t.clone() for t in self.condition)

    return GivenImagePipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=scheduler, transformer=transformer,
                              expand_timesteps=expand_timesteps)


def baseline(args) -> int:
    """diffusers' WanPipeline (with --image WanImageToVideoPipeline) denoising loop on the whole sequence,
    one GPU (the CPU without one: the debug shapes' smoke test), same shapes, steps, CFG and scheduler."""
    import numpy as np
    import torch
    from diffusers import WanPipeline, WanTransformer3DModel
    from PIL import Image

    from ds_dualparal.config import TEXT_TOKENS
    from ds_dualparal.pipeline.denoise import make_scheduler
    from ds_dualparal.wan.flops import block_step_flops
    from ds_dualparal.wan.model import WanConfig

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    wan = WanConfig(**SHAPES[args.shape])
    spatial, mode = shape_image(args.shape)
    started = time.perf_counter()
    torch.manual_seed(0)
    with device:  # diffusers' own init on the GPU, in fp32, then cast as from_pretrained casts to bf16
        transformer = as_loaded(WanTransformer3DModel(**{"text_dim": 4096, **SHAPES[args.shape]}), torch.bfloat16)
    # the DualParal worker's scheduler, at the config's default flow_shift (3; unipc: Wan's UniPC)
    scheduler = make_scheduler(args.scheduler, 3.0, 1)
    image_tokens = mode.clip_tokens if args.image else 0
    if args.image:
        embeds = None
        if image_tokens:  # random CLIP tokens, as DualParal's random condition has them
            embeds = torch.randn((1, image_tokens, wan.image_dim), generator=torch.Generator().manual_seed(1))
            embeds = embeds.to(device, torch.bfloat16)
        vae = random_vae(args.shape, spatial, device, getattr(torch, args.vae_dtype))
        pipe = image_pipeline(transformer, vae, scheduler, embeds, mode.mode == "first_frame")
    else:
        pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=scheduler, transformer=transformer)
        pipe.vae_scale_factor_spatial = spatial  # no VAE to read it from: Wan2.2-TI2V's is 16x
    pipe.set_progress_bar_config(disable=True)
    name = "WanImageToVideoPipeline" if args.image else "WanPipeline"
    load_seconds = time.perf_counter() - started
    print(f"baseline: {name} on {device}, made in {load_seconds:.1f}s", file=sys.stderr, flush=True)
    text = torch.randn((2, TEXT_TOKENS, wan.text_dim), device=device, dtype=torch.bfloat16)
    pixels = np.random.default_rng(0).integers(0, 256, (args.height, args.width, 3), dtype=np.uint8)
    picture = Image.fromarray(pixels)
    batch = 2 if args.guidance > 1 else 1

    def run(steps: int, **call) -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        pipe(**call, prompt_embeds=text[:1], negative_prompt_embeds=text[1:], num_inference_steps=steps,
             guidance_scale=args.guidance, output_type="latent")
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for case in parse_cases(args.cases):
        height, width = case.get("height", args.height), case.get("width", args.width)
        call = dict(height=height, width=width, num_frames=4 * (case["latent_frames"] - 1) + 1)
        if args.image:  # this case's condition: made by the warm-up with the VAE on the device, then kept
            call["image"] = picture.resize((width, height))
            pipe.condition = None
            pipe.vae.to(device)
        warmup_start = time.perf_counter()
        run(2, **call)
        warmup_seconds = time.perf_counter() - warmup_start
        if args.image:
            pipe.vae.to("cpu")  # DualParal's random condition holds no VAE either
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = [run(case["steps"], **call) for _ in range(args.repeats)]
        seconds = statistics.median(times)
        tokens = case["latent_frames"] * (height // spatial // 2) * (width // spatial // 2)
        flops = case["steps"] * block_step_flops(wan, tokens, 0, batch, image_tokens)
        record = dict(
            kind="diffusers", label=case["label"], shape=args.shape, image=args.image, pipeline=name, gpus=1,
            latent_frames=case["latent_frames"], height=height, width=width, steps=case["steps"],
            seconds=seconds, times=times, seconds_per_step=seconds / case["steps"],
            peak_gib=[torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0],
            mfu=flops / seconds / (PEAK_TFLOPS * 1e12), tflop=flops / 1e12, backend="default",
            guidance=args.guidance, scheduler=args.scheduler, load_seconds=load_seconds,
            warmup_seconds=warmup_seconds,
        )
        if args.image:
            record.update(condition="before timing", vae_dtype=args.vae_dtype, image_tokens=image_tokens)
        _append(Path(args.out), record)
        print(json.dumps(record), flush=True)
    return 0


def table(records: list[dict]) -> str:
    head = f"{'run':<10} {'kind':<9} {'gpus':>4} {'F':>4} {'seg':>3} {'lock':>4} {'steps':>5} {'backend':<16} {'s':>8} {'s/step':>7} {'blk-st/s':>8} {'peak GiB/GPU':>14} {'MFU':>6} {'bubble':>6} {'MB sent':>8} {'real s':>7} {'real peak GiB':>14}"
    lines = [head, "-" * len(head)]
    for r in records:
        peak = "/".join(f"{p:.2f}" for p in r["peak_gib"])
        lines.append(
            f"{r['label']:<10} {r['kind']:<9} {r['gpus']:>4} {r['latent_frames']:>4} {r.get('segments', 1):>3} {'no' if r.get('overlap', True) else 'yes':>4} {r['steps']:>5} {r['backend']:<16} "
            f"{r['seconds']:>8.2f} {r['seconds_per_step']:>7.3f} {r.get('block_steps_per_s', 0):>8.2f} {peak:>14} "
            f"{r['mfu']:>6.1%} {r.get('bubble') or 0:>6.1%} {r.get('bytes_sent', 0) / 1e6:>8.0f}"
            f" {r.get('real_total_s', 0):>7.2f} {'/'.join(f'{p:.2f}' for p in r.get('real_peak_gib', [])):>14}"
        )
    for r in records:
        for other in r.get("other_decodes", []):
            lines.append(f"{r['label']:<10} real path with decode={other['decode']}: {other['real_total_s']:.2f} s, "
                         f"peak {'/'.join(f'{p:.2f}' for p in other['real_peak_gib'])} GiB")
    if any(r["kind"] == "diffusers" and r.get("image") for r in records):
        lines.append(BASELINE_NOTE)
    return "\n".join(lines)


def _call(command: list[str], timeout: float) -> int:
    print("$", " ".join(command), flush=True)
    process = subprocess.Popen(command, start_new_session=True)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        print(f"timed out after {timeout:.0f}s: {' '.join(command)}", flush=True)
        return 124


def driver(args) -> int:
    out = Path(args.out)
    out.unlink(missing_ok=True)
    common = ["--shape", args.shape, "--height", str(args.height), "--width", str(args.width),
              "--block-size", str(args.block_size), "--context", str(args.context), "--repeats", str(args.repeats),
              "--out", str(out)]
    if args.backend:
        common += ["--backend", args.backend]
    if args.compile is not None:
        common += ["--compile" if args.compile else "--no-compile"]
    if args.real_path:
        common += ["--real-path", "--decode", ",".join(args.decode)]
    common += ["--vae-dtype", args.vae_dtype, "--guidance", str(args.guidance), "--scheduler", args.scheduler]
    common += ["--first-stage-vae-layers", str(args.first_stage_vae_layers)]
    common += ["--segments", ",".join(map(str, args.segments)), "--transition", str(args.transition)]
    if args.profile:
        common += ["--profile", args.profile]
    if args.lockstep:
        common += ["--lockstep"]
    if args.image:
        common += ["--image"]
    status = 0
    for gpus in [int(g) for g in args.gpus.split(",") if g]:
        # one GPU: a plain process (the same one-rank group, without the launcher's two extra start-ups)
        launcher = [] if gpus == 1 else ["-m", "deepspeed.launcher.runner", "--num_gpus", str(gpus), "--master_port",
                                         str(free_port())]
        command = [sys.executable, *launcher, str(Path(__file__).resolve()), "--worker", *common, "--cases", args.cases]
        status |= _call(command, args.timeout)
    if args.baseline:
        base_cases = args.baseline_cases or args.cases
        command = [sys.executable, str(Path(__file__).resolve()), "--baseline-worker", *common, "--cases", base_cases]
        status |= _call(command, args.timeout)
    records = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    print(table(records))
    return status


def flags_problem(args) -> str | None:
    """Why the shape and flags cannot run together (one line), or None."""
    image_shapes = ", ".join(name for name in SHAPES if shape_image(name)[1] is not None)
    mode = shape_image(args.shape)[1]
    if args.image and mode is None:
        return f"--image needs an image-to-video shape ({image_shapes}); --shape {args.shape} is text-to-video"
    if not args.image and mode is not None and mode.mode == "channels":
        return (f"--shape {args.shape} takes image condition channels (Wan2.1-I2V): add --image "
                "(a random image condition)")
    if args.image and args.real_path:
        return ("--real-path does not run with --image: with random weights the image condition is random, so the "
                "command's CLIP and VAE encodes of the image would not be timed, and the random VAE that decodes is "
                "Wan2.1's (16 latent channels; TI2V-5B's latents have 48); time the denoising only (drop --real-path)")
    return None


def _decodes(text: str) -> list[str]:
    modes = text.split(",")
    if any(m not in ("auto", "inline", "beside") for m in modes):  # "" too: split gives at least one
        raise argparse.ArgumentTypeError(f"{text!r}: expected modes auto, inline or beside, comma-separated")
    return modes


def _counts(text: str) -> list[int]:
    counts = [int(item) for item in text.split(",") if item]
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected counts >= 1 separated by commas, got {text!r}")
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", default="1,2", help="GPU counts to run, e.g. 1,2")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1.3b")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--block-size", type=int, default=8)
    parser.add_argument("--context", type=int, default=8)
    parser.add_argument("--cases", default="anchor:48:10", help="label:latent_frames:steps[:backend[:HxW]],...")
    parser.add_argument("--backend", default=None, help="attention backend for all cases (diffusers name)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="fused q/k/v + torch.compile (default: on with CUDA)")
    parser.add_argument("--real-path", action="store_true",
                        help="also time the command's path: text encoding, pipeline, streaming VAE decode")
    parser.add_argument("--vae-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--decode", default=["auto"], type=_decodes,
                        help="with --real-path: where one stage decodes, comma-separated modes, each a real path "
                             "of its own (auto: as the command does; inline: between its block-steps; beside: on a "
                             "stream of its own)")
    parser.add_argument("--guidance", type=float, default=5.0, help="CFG scale (1: CFG off, batch of 1)")
    parser.add_argument("--scheduler", default="unipc", choices=["unipc", "euler"])
    parser.add_argument("--first-stage-vae-layers", type=float, default=0.0,
                        help="stage 0's decoding in blocks' worth of work, for the partition")
    parser.add_argument("--segments", type=_counts, default=[1],
                        help="prompt-schedule segments to run each case with, e.g. 1,3 (random texts)")
    parser.add_argument("--transition", type=int, default=0, help="prompt_transition (blocks) with segments > 1")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="one more run per case under torch.profiler; per-rank tables in DIR (CUDA only)")
    parser.add_argument("--lockstep", action="store_true",
                        help="also run each case with every tick's transfers waited for at its end (no overlap)")
    parser.add_argument("--image", action="store_true",
                        help="image-to-video with a random image condition (shapes i2v-14b, ti2v-5b, debug-i2v, debug-ti2v)")
    parser.add_argument("--baseline", action="store_true",
                        help="also run diffusers' WanPipeline (with --image WanImageToVideoPipeline) on one GPU")
    parser.add_argument("--baseline-cases", default=None)
    parser.add_argument("--out", default="bench.jsonl")
    parser.add_argument("--timeout", type=float, default=420, help="seconds each launch may take")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--baseline-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    problem = flags_problem(args)
    if problem:
        parser.error(problem)
    if args.worker:
        return worker(args)
    if args.baseline_worker:
        return baseline(args)
    return driver(args)


if __name__ == "__main__":
    raise SystemExit(main())
