"""Image-to-video (docs/image-to-video.md): which model folders take an image and how, the checks of an
image file, and a job's image condition.

Two ways in, as diffusers' `WanImageToVideoPipeline` has them:

- ``channels`` (Wan2.1-I2V, Wan2.2-I2V-A14B): the transformer's input is the latents followed by 4 mask
  channels (1 on the first latent frame) and the VAE latents of the video ``[image, zeros, ...]``. Both are
  computed once per job on the first stage; each block's window takes its own frames' slice. Wan2.1-I2V
  also reads the image's CLIP tokens in every cross-attention: encoded on the first stage, shared with
  the other stages once per job, like the text.
- ``first_frame`` (Wan2.2-TI2V-5B, ``expand_timesteps``): the first latent frame is the image's latent and
  stays clean, its tokens at timestep 0 (per-token timesteps); only block 0 holds that frame.

No torch at import: the pre-flight checks use this module before anything heavy starts.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

IMAGE_FORMATS = ("PNG", "JPEG")
# Past these an image is refused before anything loads: ~8K x 8K pixels decode to ~200 MB and take
# seconds; a larger one is more likely a decompression bomb than a first frame.
MAX_IMAGE_PIXELS = 8192 * 8192
MAX_IMAGE_BYTES = 256 * 2**20
# Wan2.1's VAE, for folders whose vae/config.json does not say.
DEFAULT_SPATIAL_FACTOR = 8
MASK_CHANNELS = 4  # one per video frame of a latent frame (the VAE's temporal factor)


@dataclass(frozen=True)
class ImageInput:
    """How a model takes an image."""

    mode: Literal["channels", "first_frame"]
    clip_tokens: int = 0  # image tokens in every cross-attention (Wan2.1-I2V's CLIP); 0: none


def read_vae_config(model_path: Path) -> dict:
    """The VAE's config.json (an empty dict when the folder has none: Wan2.1's VAE)."""
    path = Path(model_path) / "vae" / "config.json"
    if not path.is_file():
        return {}
    config = json.loads(path.read_text())
    return config if isinstance(config, dict) else {}


def spatial_factor(vae_config: dict) -> int:
    """Pixels per latent pixel along height and width: 8 for Wan2.1's VAE, 16 for Wan2.2's (a 2x2
    patchify in front of 8x), as diffusers' pipelines read it."""
    factor = vae_config.get("scale_factor_spatial")
    return factor if isinstance(factor, int) and not isinstance(factor, bool) and factor > 0 else DEFAULT_SPATIAL_FACTOR


def image_input(model_path: Path, wan, index: dict) -> ImageInput | None:
    """How the model in `model_path` (its first transformer's WanConfig `wan`, its model_index.json
    `index`) takes an image; None for a text-only model."""
    latent = wan.out_channels
    if index.get("expand_timesteps") is True and wan.in_channels == latent:
        return ImageInput("first_frame")
    if wan.in_channels != 2 * latent + MASK_CHANNELS:
        return None
    if not wan.image_dim:
        return ImageInput("channels")
    config_path = Path(model_path) / "image_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    vision = config.get("vision_config", config)
    tokens = (vision["image_size"] // vision["patch_size"]) ** 2 + 1  # patches and the class token
    return ImageInput("channels", tokens)


def image_problem(path: str) -> str | None:
    """Why the file at `path` cannot be a first frame (one line), or None. Reads the header, then decodes
    the pixels, so that a truncated file is found here rather than after the model loads."""
    from PIL import Image, UnidentifiedImageError

    try:
        size = os.stat(path).st_size
        if size > MAX_IMAGE_BYTES:
            return f"{path}: {size / 2**20:.0f} MiB is more than the {MAX_IMAGE_BYTES // 2**20} MiB an image may have"
        with Image.open(path) as image:
            if image.format not in IMAGE_FORMATS:
                return f"{path}: a {image.format} image; allowed: PNG or JPEG"
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                return (f"{path}: {width}x{height} pixels is more than the {MAX_IMAGE_PIXELS // 2**20} megapixels "
                        "an image may have; scale it down")
            image.load()
    except FileNotFoundError:
        return f"{path}: file not found"
    except IsADirectoryError:
        return f"{path}: is a folder, not an image file"
    except UnidentifiedImageError:
        return f"{path}: not an image (PNG or JPEG)"
    except Image.DecompressionBombError:
        return f"{path}: more pixels than an image may have; scale it down"
    except (OSError, ValueError, SyntaxError) as err:  # PIL reports a damaged file in any of these
        return f"{path}: cannot read the image ({getattr(err, 'strerror', None) or err})"
    return None


def load_image(path: str):
    """The image at `path` as an RGB PIL image (checked first by `image_problem`)."""
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def file_digest(path: str) -> str:
    """sha256 of the image file's bytes: what a resume checkpoint's fingerprint records (not its path)."""
    import hashlib

    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(2**20), b""):
            sha.update(chunk)
    return sha.hexdigest()


@dataclass
class ImageCondition:
    """One job's image condition. `embeds` (CLIP tokens, Wan2.1-I2V) is on every stage once shared;
    `channels` and `first_frame` are the first stage's (the window input is made there)."""

    embeds: torch.Tensor | None = None  # (1, clip tokens, image_dim), the model's dtype
    channels: torch.Tensor | None = None  # (1, 4 + z, F, h, w) fp32: mask, then the condition latents
    first_frame: torch.Tensor | None = None  # (1, z, 1, h, w) fp32: the image's normalized latent


def encode_condition_latents(vae, pixels: torch.Tensor, latent_frames: int) -> torch.Tensor:
    """Normalized VAE latents (1, z, latent_frames, h, w) of the video ``[pixels, zeros, ...]`` of
    ``1 + 4 (latent_frames - 1)`` frames, in fp32: the same encoder calls as diffusers'
    ``AutoencoderKLWan.encode`` (the first frame, then 4 frames at a time, through the causal cache),
    but the zero frames are made one chunk at a time, so memory holds one chunk of pixels, not the video.

    `pixels`: (1, 3, H, W) in [-1, 1]."""
    import torch
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, patchify

    config = vae.config
    frame = pixels.to(vae.device, vae.dtype).unsqueeze(2)
    zeros = frame.new_zeros(frame.shape[0], frame.shape[1], 4, *frame.shape[3:])
    if config.patch_size is not None:
        frame, zeros = patchify(frame, patch_size=config.patch_size), patchify(zeros, patch_size=config.patch_size)
    cache = [None] * sum(isinstance(m, WanCausalConv3d) for m in vae.encoder.modules())
    mean = torch.tensor(config.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(config.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
    chunks = []
    with torch.no_grad():
        for index in range(latent_frames):
            out = vae.encoder(frame if index == 0 else zeros, feat_cache=cache, feat_idx=[0])
            # the posterior's mode: the first z channels of quant_conv (1x1x1, frame by frame)
            latent = vae.quant_conv(out)[:, : config.z_dim].float().cpu()
            chunks.append((latent - mean) * inv_std)
    return torch.cat(chunks, dim=2)


def mask_channels(latent_frames: int, height: int, width: int) -> torch.Tensor:
    """(1, 4, F, h, w) fp32: ones on the first latent frame (the given image's), zeros after."""
    import torch

    mask = torch.zeros(1, MASK_CHANNELS, latent_frames, height, width)
    mask[:, :, 0] = 1.0
    return mask


def encode_clip_tokens(model_path: Path, image_paths: list[str], device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Per distinct image file, its CLIP tokens (1, tokens, image_dim) in `dtype`, kept on the CPU until a
    job runs: the image encoder is loaded once for all the jobs and freed before denoising starts, as the
    text encoder is (wan/text.py)."""
    import gc

    import torch
    from transformers import AutoImageProcessor, CLIPVisionModel

    distinct = list(dict.fromkeys(image_paths))
    if not distinct:
        return {}
    processor = AutoImageProcessor.from_pretrained(Path(model_path) / "image_processor")
    encoder = CLIPVisionModel.from_pretrained(Path(model_path) / "image_encoder", dtype=torch.float32,
                                              use_safetensors=True).to(device).eval()
    tokens = {}
    with torch.no_grad():
        for path in distinct:
            try:
                image = load_image(path)
            except (OSError, ValueError):  # changed since the checks: its own job reports it, the others run
                continue
            inputs = processor(images=image, return_tensors="pt").to(device)
            # diffusers' WanImageToVideoPipeline.encode_image: the penultimate layer's hidden states
            tokens[path] = encoder(**inputs, output_hidden_states=True).hidden_states[-2].to(dtype).cpu()
    del encoder
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return tokens


def encode_image(model_path: Path, mode: ImageInput, image_path: str, vae, plan, spatial: int, device,
                 dtype: torch.dtype, clip_tokens: torch.Tensor | None = None) -> ImageCondition:
    """The image condition of one job, on the first stage: CLIP tokens (in `dtype`) when the model reads
    them, and the condition latents (`channels`) or the clean first latent frame (`first_frame`).
    `clip_tokens`: the image's tokens from `encode_clip_tokens`, when the run encoded them up front."""
    import torch
    from diffusers.video_processor import VideoProcessor

    image = load_image(image_path)
    height, width = plan.latent_height * spatial, plan.latent_width * spatial
    pixels = VideoProcessor(vae_scale_factor=spatial).preprocess(image, height=height, width=width).float()
    condition = ImageCondition()
    if mode.clip_tokens:
        if clip_tokens is None:
            clip_tokens = encode_clip_tokens(model_path, [image_path], device, dtype)[image_path]
        condition.embeds = clip_tokens.to(device)
    if mode.mode == "first_frame":
        condition.first_frame = encode_condition_latents(vae, pixels, 1)
    else:
        frames = plan.timeline.num_frames
        latents = encode_condition_latents(vae, pixels, frames)
        condition.channels = torch.cat([mask_channels(frames, plan.latent_height, plan.latent_width), latents], dim=1)
    return condition


def job_problem(cfg, mode: ImageInput | None, spatial: int, patch_size) -> tuple[str, str] | None:
    """(field, why) when the model cannot take job `cfg` (its size, its image), or None. `mode`,
    `spatial` and `patch_size` are the model's (`image_input`, `spatial_factor`, the transformer's)."""
    multiple = spatial * patch_size[1]
    for name, value in (("height", cfg.height), ("width", cfg.width)):
        if value % multiple:
            low = value - value % multiple
            nearest = f"{low} or {low + multiple}" if low else str(multiple)
            return name, (f"{value} is not a multiple of {multiple} (this model's VAE compresses {spatial}x and its "
                          f"patches are {patch_size[1]}x{patch_size[2]}); nearest valid: {nearest}")
    if mode is not None and mode.mode == "channels" and not cfg.image:
        return "image", ("the model is image-to-video (its transformer takes condition channels): give the video's "
                         "first frame, a PNG or JPEG file")
    if cfg.image:
        if mode is None:
            return "image", ("the model is text-to-video only (its transformer takes no condition channels and its "
                             "model_index.json no expand_timesteps); use an image-to-video model: Wan2.1-I2V, "
                             "Wan2.2-I2V-A14B or Wan2.2-TI2V-5B")
        problem = image_problem(cfg.image)
        if problem is not None:
            return "image", problem
    return None


# Wan2.1-I2V's CLIP (ViT-H/14 at 224 pixels): 16 x 16 patches and the class token.
CLIP_TOKENS = 257
WAN22_LATENT_CHANNELS = 48


def random_weights_image(wan) -> tuple[int, ImageInput | None]:
    """(VAE spatial factor, image input) of a transformer shape run with random weights (benchmarks,
    no folder): 2 z + 4 input channels take condition channels (and CLIP tokens with an `image_dim`);
    48 latent channels are Wan2.2-TI2V's, whose VAE compresses 16x."""
    if wan.in_channels == 2 * wan.out_channels + MASK_CHANNELS:
        return DEFAULT_SPATIAL_FACTOR, ImageInput("channels", CLIP_TOKENS if wan.image_dim else 0)
    if wan.in_channels == wan.out_channels == WAN22_LATENT_CHANNELS:
        return 16, ImageInput("first_frame")
    return DEFAULT_SPATIAL_FACTOR, None


def random_condition(plan, mode: ImageInput, wan, seed: int, dtype: torch.dtype, device) -> ImageCondition:
    """A seeded random image condition of the plan's shapes, for random weights (benchmarks)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    size = (plan.latent_height, plan.latent_width)
    condition = ImageCondition()
    if mode.clip_tokens:
        condition.embeds = torch.randn(1, mode.clip_tokens, wan.image_dim, generator=generator).to(device, dtype)
    if mode.mode == "first_frame":
        condition.first_frame = torch.randn(1, wan.out_channels, 1, *size, generator=generator)
    else:
        frames = plan.timeline.num_frames
        latents = torch.randn(1, wan.out_channels, frames, *size, generator=generator)
        condition.channels = torch.cat([mask_channels(frames, *size), latents], dim=1)
    return condition
