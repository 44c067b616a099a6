"""Image-to-video (`--image`) on tiny random Wan2.1-I2V and Wan2.2-TI2V folders: one block without context
equals diffusers' `WanImageToVideoPipeline`; several blocks are bit-identical on 1 and 2 stages; bad input
is refused in one line before weights load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import RANDOM_TINY, run_deepspeed, run_generate, run_main
from PIL import Image
from safetensors.torch import load_file

from ds_dualparal.config import DualParalConfig
from ds_dualparal.pipeline.generation import reference_latents
from ds_dualparal.pipeline.image import encode_condition_latents
from ds_dualparal.toy.tiny_i2v import write_tiny_i2v


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("i2v-models")
    with torch.no_grad():
        return {kind: write_tiny_i2v(root / kind, kind=kind, num_layers=3) for kind in ("i2v", "i2v-a14b", "ti2v")}


def write_image(path: Path, seed: int, size=(56, 40), fmt="PNG") -> Path:
    """A smooth random picture (a few random blobs of colour), `size` = (width, height)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : size[1], 0 : size[0]] / max(size)
    pixels = np.zeros((size[1], size[0], 3))
    for _ in range(4):
        cy, cx, r = rng.uniform(0, 1, 3)
        pixels += rng.uniform(0, 1, 3) * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (0.05 + 0.2 * r))[..., None]
    Image.fromarray((255 * pixels / pixels.max()).astype(np.uint8)).save(path, format=fmt)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    return write_image(root / "a.png", 0), write_image(root / "b.jpg", 1, fmt="JPEG")


# One block that holds the whole video (block_size = latent frames), no context: the degenerate case.
SIZES = {"i2v": dict(height=32, width=48), "i2v-a14b": dict(height=32, width=48), "ti2v": dict(height=64, width=96)}


def one_block(model: Path, kind: str, image: Path | None, **overrides) -> DualParalConfig:
    return DualParalConfig(**{**dict(
        model=str(model), image=None if image is None else str(image), prompt="a cat walks on the grass",
        negative_prompt="blurry", num_frames=9, num_inference_steps=3, guidance_scale=5.0, block_size=3,
        context=0, dtype="float32", vae_dtype="float32", seed=7), **SIZES[kind], **overrides})


def diffusers_latents(model: Path, kind: str, cfg: DualParalConfig) -> torch.Tensor:
    from diffusers import WanImageToVideoPipeline, WanPipeline

    if kind != "ti2v":
        pipe = WanImageToVideoPipeline.from_pretrained(model, dtype=torch.float32)
    else:  # Wan2.2-TI2V ships as a WanPipeline; its image path is WanImageToVideoPipeline's expand_timesteps
        parts = WanPipeline.from_pretrained(model, dtype=torch.float32).components
        parts = {k: v for k, v in parts.items() if k in ("tokenizer", "text_encoder", "vae", "scheduler", "transformer")}
        pipe = (WanImageToVideoPipeline(**parts, expand_timesteps=True) if cfg.image
                else WanPipeline(**parts, expand_timesteps=True))
    pipe.set_progress_bar_config(disable=True)
    extra = {"image": Image.open(cfg.image).convert("RGB")} if cfg.image else {}
    return pipe(prompt=cfg.prompt, negative_prompt=cfg.negative_prompt, height=cfg.height, width=cfg.width,
                num_frames=cfg.num_frames, num_inference_steps=cfg.num_inference_steps,
                guidance_scale=cfg.guidance_scale, generator=torch.Generator().manual_seed(cfg.seed),
                output_type="latent", **extra).frames


@pytest.mark.parametrize("kind", ["i2v", "i2v-a14b", "ti2v"])
def test_one_block_equals_wan_image_to_video_pipeline(models, images, kind):
    # 4 steps: timesteps 999, 900 (>= 875: the high-noise expert of i2v-a14b), 750, 500 (the low-noise one)
    cfg = one_block(models[kind], kind, images[0], num_inference_steps=4)
    ours = reference_latents(cfg)
    theirs = diffusers_latents(models[kind], kind, cfg)
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() < 1e-4
    other = reference_latents(cfg.with_overrides(image=str(images[1])))
    assert (other - ours).abs().max() > 1e-2  # the image matters
    if kind == "ti2v":  # the first latent frame is the image's latent, untouched by denoising
        torch.testing.assert_close(ours[:, :, :1], image_latent(models[kind], images[0], cfg), rtol=0, atol=1e-5)


def image_latent(model: Path, image: Path, cfg: DualParalConfig) -> torch.Tensor:
    from diffusers import AutoencoderKLWan
    from diffusers.video_processor import VideoProcessor

    vae = AutoencoderKLWan.from_pretrained(model / "vae")
    factor = vae.config.scale_factor_spatial
    pixels = VideoProcessor(vae_scale_factor=factor).preprocess(Image.open(image).convert("RGB"), height=cfg.height,
                                                                width=cfg.width)
    return encode_condition_latents(vae, pixels, 1)


def test_ti2v_without_an_image_is_text_to_video_at_the_vae_size(models):
    """The Wan2.2 VAE compresses 16x: latents are height/16 x width/16 (they were /8 before) and equal
    WanPipeline's expand_timesteps path."""
    cfg = one_block(models["ti2v"], "ti2v", None)
    ours = reference_latents(cfg)
    assert ours.shape == (1, 48, 3, cfg.height // 16, cfg.width // 16)
    assert (ours - diffusers_latents(models["ti2v"], "ti2v", cfg)).abs().max() < 1e-4


def test_condition_latents_streamed_equal_the_vae_encode(models, images):
    """The condition is encoded a chunk at a time and equals AutoencoderKLWan.encode of [image, zeros...]."""
    from diffusers import AutoencoderKLWan
    from diffusers.video_processor import VideoProcessor

    vae = AutoencoderKLWan.from_pretrained(models["i2v"] / "vae")
    pixels = VideoProcessor(vae_scale_factor=8).preprocess(Image.open(images[0]).convert("RGB"), height=32, width=48)
    video = torch.cat([pixels.unsqueeze(2), torch.zeros(1, 3, 8, 32, 48)], dim=2)
    with torch.no_grad():
        whole = vae.encode(video).latent_dist.mode()
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(encode_condition_latents(vae, pixels, 3), (whole - mean) / std, rtol=1e-5, atol=1e-6)


# Several blocks with context and feature cache: 7 latent frames, B = 2, c = 1 -> blocks of 3, 2, 2 frames.
SEVERAL = dict(num_frames=25, block_size=2, context=1, num_inference_steps=3)


def cli_args(cfg: DualParalConfig) -> list[str]:
    return ["--model", cfg.model, "--image", cfg.image, "--prompt", cfg.prompt, "--negative-prompt", cfg.negative_prompt,
            "--height", cfg.height, "--width", cfg.width, "--frames", cfg.num_frames, "--steps", cfg.num_inference_steps,
            "--block-size", cfg.block_size, "--context", cfg.context, "--dtype", "float32", "--seed", cfg.seed]


@pytest.mark.parametrize("kind,stages", [("i2v", 2), ("ti2v", 2), ("ti2v", 3)])
def test_several_blocks_bit_identical_on_any_stage_count(models, images, tmp_path, kind, stages):
    cfg = one_block(models[kind], kind, images[0], **SEVERAL)
    want = reference_latents(cfg)
    run = run_deepspeed(stages, *cli_args(cfg), "--output", "v.mp4", "--save-latents", "v.safetensors", cwd=tmp_path)
    assert run.returncode == 0, run.explain()
    assert torch.equal(load_file(tmp_path / "v.safetensors")["latents"], want)
    if kind == "ti2v":  # the estimate at the 16x VAE's size: windows of 3 + 1 frames of 2x3 tokens
        assert "block-steps of 24 tokens (+6 cached)" in run.stdout + run.stderr
    if stages == 2:  # and one plain process
        run = run_generate(*cli_args(cfg), "--output", "p.mp4", "--save-latents", "p.safetensors", cwd=tmp_path)
        assert run.returncode == 0, run.explain()
        assert torch.equal(load_file(tmp_path / "p.safetensors")["latents"], want)


def test_two_replicas_of_two_stages_each_with_its_jobs_image(models, images, tmp_path):
    """Jobs lines carry their own image; each replica encodes its job's image and shares its CLIP tokens."""
    cfg = one_block(models["i2v"], "i2v", images[0], **SEVERAL)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps({"image": str(image), "save_latents": f"{n}.safetensors"}) + "\n"
                            for n, image in enumerate(images)))
    args = cli_args(cfg)
    args = args[: args.index("--image")] + args[args.index("--image") + 2 :]
    run = run_deepspeed(4, *args, "--stages", "2", "--jobs", jobs, "--output-dir", "out", cwd=tmp_path)
    assert run.returncode == 0, run.explain()
    for n, image in enumerate(images):
        saved = load_file(tmp_path / "out" / f"{n}.safetensors")["latents"]
        assert torch.equal(saved, reference_latents(cfg.with_overrides(image=str(image))))


def test_image_file_problems(tmp_path, images, monkeypatch):
    from ds_dualparal.pipeline import image as image_module
    from ds_dualparal.pipeline.image import image_problem

    assert image_problem(str(images[0])) is None and image_problem(str(images[1])) is None
    assert image_problem(str(tmp_path / "missing.png")).endswith("file not found")
    (tmp_path / "notes.png").write_text("not a picture")
    assert image_problem(str(tmp_path / "notes.png")).endswith("not an image (PNG or JPEG)")
    gif = write_image(tmp_path / "a.gif", 0, fmt="GIF")
    assert image_problem(str(gif)).endswith("a GIF image; allowed: PNG or JPEG")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(images[0].read_bytes()[:400])
    assert "cannot read the image" in image_problem(str(truncated))
    assert "is a folder" in image_problem(str(tmp_path))
    monkeypatch.setattr(image_module, "MAX_IMAGE_PIXELS", 56 * 40 - 1)
    assert "56x40 pixels is more than" in image_problem(str(images[0]))
    monkeypatch.setattr(image_module, "MAX_IMAGE_BYTES", 100)
    assert "MiB is more than" in image_problem(str(images[0]))


def refused(run, start: str) -> None:
    """Exit 2, one line naming the flag, before any weights load."""
    assert run.returncode == 2, run.explain()
    lines = [line for line in run.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and lines[0].startswith("generate.py: error: " + start), run.explain()
    assert "Traceback" not in run.stderr and "loaded in" not in run.stdout + run.stderr


def test_bad_input_is_refused_before_weights_load(models, images, tmp_path):
    (tmp_path / "notes.png").write_text("not a picture")
    common = ["--frames", "9", "--steps", "1", "--output", "v.mp4"]
    refused(run_main("--model", models["i2v"], "--image", "notes.png", "--height", 32, "--width", 48, *common,
                     cwd=tmp_path), "--image: notes.png: not an image")
    refused(run_main("--model", RANDOM_TINY, "--image", images[0], "--height", 32, "--width", 48, *common,
                     cwd=tmp_path), "--image: the model is text-to-video only")
    refused(run_main("--model", models["ti2v"], "--image", images[0], "--height", 48, "--width", 96, *common,
                     cwd=tmp_path), "--height: 48 is not a multiple of 32 (this model's VAE compresses 16x")
    assert not list(tmp_path.glob("*.mp4"))


def test_a_prompt_schedule_with_an_image(models, images):
    """Without context each block is the single-prompt run of its segment, image condition included."""
    cfg = one_block(models["i2v"], "i2v", images[0], num_frames=25, block_size=2, context=0)
    segments = ({"from_frame": 0, "prompt": "a cat walks on the grass"}, {"from_frame": 12, "prompt": "a dog runs"})
    schedule = reference_latents(cfg.with_overrides(prompts=segments))
    cat, dog = (reference_latents(cfg.with_overrides(prompt=s["prompt"])) for s in segments)
    # blocks of 3, 2, 2 latent frames: block 0 (video frames 0-8) takes the cat, blocks 1 and 2 the dog
    assert torch.equal(schedule[:, :, :3], cat[:, :, :3]) and torch.equal(schedule[:, :, 3:], dog[:, :, 3:])
    assert (cat[:, :, 3:] - dog[:, :, 3:]).abs().max() > 1e-2


def test_a_lora_with_an_image_is_the_pipeline_with_the_lora_fused(models, images, tmp_path):
    from diffusers import WanImageToVideoPipeline
    from test_lora import write_lora

    from ds_dualparal.wan.model import WanConfig

    wan = WanConfig.from_json(models["i2v"] / "transformer" / "config.json")
    lora = write_lora(tmp_path / "lora.safetensors", wan, "diffusers")
    cfg = one_block(models["i2v"], "i2v", images[0], loras=[{"path": str(lora), "scale": 0.7}])
    ours = reference_latents(cfg)
    pipe = WanImageToVideoPipeline.from_pretrained(models["i2v"], dtype=torch.float32)
    pipe.load_lora_weights(lora)
    pipe.fuse_lora(lora_scale=0.7)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(image=Image.open(cfg.image).convert("RGB"), prompt=cfg.prompt, negative_prompt=cfg.negative_prompt,
                  height=cfg.height, width=cfg.width, num_frames=cfg.num_frames,
                  num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                  generator=torch.Generator().manual_seed(cfg.seed), output_type="latent").frames
    assert (ours - theirs).abs().max() < 1e-4
    assert (ours - reference_latents(cfg.with_overrides(loras=()))).abs().max() > 1e-2


def test_a_resume_checkpoint_fingerprints_the_image_content_not_its_path(models, images, tmp_path):
    from ds_dualparal.output.checkpoint import fingerprint, fingerprint_fields

    def of(image: Path) -> str:
        return fingerprint(fingerprint_fields(one_block(models["i2v"], "i2v", image), models["i2v"]))

    here, there = tmp_path / "here.png", tmp_path / "there.png"
    shutil.copy(images[0], here)
    shutil.copy(images[0], there)
    same = of(here)
    assert of(there) == same
    write_image(here, 5)
    assert of(here) != same


def test_a_ti2v_run_with_an_image_resumes_from_its_checkpoint_bit_for_bit(models, images, tmp_path):
    """Killed after the checkpoint at iteration 2 (of 5), run again: the uninterrupted latents (the
    checkpoint's latents are at the Wan2.2 VAE's 16x size)."""
    from ds_dualparal.pipeline.schedule import DualParalSchedule, SaveCheckpoint
    from ds_dualparal.pipeline.timeline import BlockTimeline

    cfg = one_block(models["ti2v"], "ti2v", images[0], **SEVERAL)
    args = [*cli_args(cfg), "--output", "v.mp4", "--save-latents", "v.safetensors", "--checkpoint-dir", "ck",
            "--checkpoint-every", 2]
    timeline = BlockTimeline(cfg.latent_frames, cfg.block_size, cfg.context, cfg.num_inference_steps)
    ticks = list(DualParalSchedule(timeline, 1, 0, checkpoint_every=2).steps())
    saved = next(n for n, tick in enumerate(ticks) if SaveCheckpoint(2) in tick)
    killed = run_generate(*args, cwd=tmp_path, env={"DS_DUALPARAL_FAULT": f"rank=0,tick={saved + 1},action=kill"})
    assert killed.returncode == -9 and (tmp_path / "ck" / "iter_000002").is_dir(), killed.explain()
    resumed = run_generate(*args, cwd=tmp_path)
    assert resumed.returncode == 0 and "resuming from ck/iter_000002" in resumed.stdout + resumed.stderr, resumed.explain()
    assert torch.equal(load_file(tmp_path / "v.safetensors")["latents"], reference_latents(cfg))


def test_the_estimate_counts_the_condition_channels_the_image_tokens_and_the_vae_size(models, images):
    from ds_dualparal.pipeline.estimate import estimate
    from ds_dualparal.wan.flops import block_step_flops
    from ds_dualparal.wan.model import WanConfig

    wan = WanConfig.from_json(models["i2v"] / "transformer" / "config.json")
    cfg = one_block(models["i2v"], "i2v", images[0])
    with_image, without = estimate(cfg, wan, 8, 17), estimate(cfg.with_overrides(image=None), wan, 8, 0)
    latent_pixels = cfg.latent_frames * (cfg.height // 8) * (cfg.width // 8)
    assert with_image.first_stage_bytes - without.first_stage_bytes == (4 + 16) * latent_pixels * 4  # mask + condition
    window, layers, d = with_image.window_tokens, wan.num_layers, wan.inner_dim
    extra = 2 * layers * (2 * 2 * 17 * d * d + 2 * 2 * window * 17 * d) * with_image.block_steps
    assert (with_image.tflop - without.tflop) * 1e12 == pytest.approx(extra)
    assert block_step_flops(wan, window, 0, 2, 17) > block_step_flops(wan, window, 0, 2)
    ti2v = WanConfig.from_json(models["ti2v"] / "transformer" / "config.json")
    work = estimate(one_block(models["ti2v"], "ti2v", images[0]), ti2v, 16)
    assert work.window_tokens == 3 * (64 // 32) * (96 // 32)  # 16x VAE, 2x2 patches
    clean = estimate(one_block(models["ti2v"], "ti2v", images[0]), ti2v, 16, clean_first_frame=True)
    # block 0's per-token modulation, CFG batch of 2, in fp32 (the config's dtype) and again in fp32
    assert clean.first_stage_bytes - work.first_stage_bytes == 2 * work.window_tokens * 6 * ti2v.inner_dim * (4 + 4)


def test_shipped_configs_fit_their_models():
    from ds_dualparal.config import load_config
    from ds_dualparal.pipeline.image import ImageInput, job_problem

    configs = Path(__file__).resolve().parents[1] / "ds_configs"
    i2v = load_config(configs / "wan2.1-i2v-14b-480p.json").dualparal
    ti2v = load_config(configs / "wan2.2-ti2v-5b-720p.json").dualparal
    assert (i2v.model, i2v.height, i2v.width) == ("Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", 480, 832)
    assert (ti2v.model, ti2v.height, ti2v.width) == ("Wan-AI/Wan2.2-TI2V-5B-Diffusers", 704, 1280)
    clip = ImageInput("channels", 257)
    # Wan2.1-I2V needs the image (the command line gives it); TI2V runs as text-to-video without one
    assert job_problem(i2v, clip, 8, (1, 2, 2))[0] == "image"
    assert job_problem(i2v.with_overrides(image="first.png"), clip, 8, (1, 2, 2)) == ("image", "first.png: file not found")
    assert job_problem(ti2v, ImageInput("first_frame"), 16, (1, 2, 2)) is None
    assert job_problem(ti2v.with_overrides(height=720), ImageInput("first_frame"), 16, (1, 2, 2))[0] == "height"


def test_random_weights_take_the_image_of_their_shape():
    """Benchmarks with random weights (launch/bench.py --image): the kind and VAE factor follow the shape."""
    from ds_dualparal.pipeline.image import ImageInput, random_weights_image
    from ds_dualparal.wan.model import WanConfig

    shape = dict(num_layers=1, num_attention_heads=2, attention_head_dim=12)
    assert random_weights_image(WanConfig(**shape)) == (8, None)
    assert random_weights_image(WanConfig(**shape, in_channels=36, image_dim=16)) == (8, ImageInput("channels", 257))
    assert random_weights_image(WanConfig(**shape, in_channels=36)) == (8, ImageInput("channels", 0))
    assert random_weights_image(WanConfig(**shape, in_channels=48, out_channels=48)) == (16, ImageInput("first_frame"))


def test_the_image_encoder_loads_once_for_all_the_jobs(models, images, tmp_path, monkeypatch):
    """A run's CLIP tokens come from one image encoder load (as its prompts from one text encoder load),
    each distinct image once; they equal a job's own encode, and a file that cannot be read is left to
    its own job to report."""
    from transformers import CLIPVisionModel

    from ds_dualparal.pipeline.image import encode_clip_tokens

    loads = []
    load = CLIPVisionModel.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        loads.append(args[0])
        return load(cls, *args, **kwargs)

    monkeypatch.setattr(CLIPVisionModel, "from_pretrained", classmethod(counting))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    paths = [str(images[0]), str(images[1]), str(images[0]), str(broken)]
    tokens = encode_clip_tokens(models["i2v"], paths, "cpu", torch.float32)
    assert len(loads) == 1 and list(tokens) == [str(images[0]), str(images[1])]
    one = encode_clip_tokens(models["i2v"], [str(images[1])], "cpu", torch.float32)[str(images[1])]
    assert torch.equal(tokens[str(images[1])], one) and not torch.equal(tokens[str(images[0])], one)
