"""A clip to continue (`--continue-from`, docs/continue-a-clip.md).

The clip is latents written by `--save-latents` (a `.safetensors` file, key `latents`) or a video
file that the model's VAE encodes. Its latent frames are the timeline's prefix: final before the
first iteration, the first frames of the result, and block 0's context. What can be wrong with it
(unreadable, truncated, another size or channel count, non-finite, too long) is found by
`clip_problem` before any weights load; every rank reads the clip's length (`latent_frames`) to
build the same timeline; the first stage reads the clip itself (`load_clip`).

Video length rule: Wan's causal VAE turns 4k+1 frames into k+1 latent frames. A video of another
length loses its first (n-1) mod 4 frames (a warning says so), so that the clip keeps its last
frame, where the continuation joins it.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import TEMPORAL_FACTOR
from .image import DEFAULT_SPATIAL_FACTOR
from .timeline import BlockTimeline

log = logging.getLogger(__name__)

LATENTS_KEY = "latents"  # what --save-latents writes
VAE_KEY = "vae"  # --save-latents' metadata: the fingerprint of the VAE whose latent space they are in
LATENTS_SUFFIX = ".safetensors"
LATENT_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}  # exact in float32


@dataclass(frozen=True)
class Clip:
    """The first stage's clip: its latents as the transformer sees them, and a video clip's own frames."""

    latents: torch.Tensor  # (1, C, P, h, w) float32, normalized (what --save-latents holds)
    frames: np.ndarray | None = None  # a video clip's frames (n, H, W, 3) uint8, written as they are


def latents_metadata(model_path: Path) -> dict[str, str]:
    """What --save-latents records of the model: its VAE's fingerprint (as `modelcheck.weights_fingerprint`
    reads weights: headers, sizes, sampled bytes, config), which gives latents their meaning in pixels."""
    from ..wan.modelcheck import weights_fingerprint

    return {VAE_KEY: weights_fingerprint(Path(model_path), ("vae",))}


def is_latents_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() == LATENTS_SUFFIX


def latent_frames(path: str | Path | None) -> int:
    """The clip's latent frames (0 without a clip); every rank reads it to build the timeline."""
    if path is None:
        return 0
    if is_latents_file(path):
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return f.get_slice(LATENTS_KEY).get_shape()[2]
    return _video_latent_frames(_count_video_frames(path))


def job_timeline(cfg) -> BlockTimeline:
    """The timeline of job `cfg`: its frames, blocks and steps, after its clip if it continues one."""
    return BlockTimeline(cfg.latent_frames, cfg.block_size, cfg.context, cfg.num_inference_steps,
                         latent_frames(cfg.continue_from))


def clip_problem(cfg, channels: int, spatial: int = DEFAULT_SPATIAL_FACTOR, image_model: bool = False) -> str | None:
    """What is wrong with job `cfg`'s clip for a model of `channels` latent channels whose VAE compresses
    space `spatial` times, in one line (without the field's name); None when it can be continued. Reads
    the whole clip. `image_model`: the model takes an image's condition channels, which a clip has not."""
    if image_model:
        return ("this image-to-video model needs an image for its condition channels, which continuing a clip "
                "does not give; continue with a text-to-video model")
    if cfg.image:
        return "give --image or --continue-from, not both (a continued video's first frames are the clip's)"
    path = Path(cfg.continue_from)
    if not path.is_file():
        return f"{_shown(path)}: " + ("is not a file" if path.exists() else "file not found")
    size = (cfg.height // spatial, cfg.width // spatial)
    try:
        if is_latents_file(path):
            frames, problem = _latents_problem(path, channels, size, cfg.model)
        else:
            frames, problem = _video_problem(path, cfg.height, cfg.width)
    except OSError as err:
        return f"{_shown(path)}: cannot read it ({err.strerror or err})"
    if problem is not None:
        return f"{_shown(path)}: {problem}"
    if frames >= cfg.latent_frames:
        video = TEMPORAL_FACTOR * (frames - 1) + 1
        return (f"{_shown(path)} holds {video} video frames ({frames} latent); --frames ({cfg.num_frames}) counts the "
                f"whole video, clip included: give at least {video + TEMPORAL_FACTOR}")
    return None


def _latents_problem(path: Path, channels: int, size: tuple[int, int], model: str | None) -> tuple[int, str | None]:
    from safetensors import SafetensorError, safe_open

    from ..wan.weights import resolve_model

    try:
        with safe_open(str(path), "pt") as f:
            vae = (f.metadata() or {}).get(VAE_KEY)
            if vae is not None and vae != latents_metadata(resolve_model(model))[VAE_KEY]:
                return 0, ("was saved by a model with another VAE, whose latents mean other pixels; continue it with "
                           "that model, or from its video")
            keys = list(f.keys())
            if LATENTS_KEY not in keys:
                found = ", ".join(keys[:5]) or "none"
                return 0, f"has no '{LATENTS_KEY}' tensor (it has {found}); give a --save-latents file"
            entry = f.get_slice(LATENTS_KEY)
            shape, dtype = tuple(entry.get_shape()), entry.get_dtype()
            want = f"(1, {channels}, frames, {size[0]}, {size[1]})"
            if len(shape) != 5 or shape[0] != 1 or shape[1] != channels or shape[3:] != size or shape[2] < 1:
                return 0, (f"latents of shape {shape}; this model and --height/--width need {want} "
                           "(a clip of another size or model)")
            if dtype not in LATENT_DTYPES:
                return 0, f"latents of dtype {dtype}; allowed: {', '.join(LATENT_DTYPES.values())}"
            latents = f.get_tensor(LATENTS_KEY)
    except SafetensorError as err:  # a truncated or corrupt file; not an OSError
        return 0, f"is not a whole safetensors file ({' '.join(str(err).splitlines())}); is it truncated?"
    bad = int((~torch.isfinite(latents)).sum())
    if bad:
        return 0, f"{bad} of {latents.numel()} latent values are not finite (NaN or inf)"
    return shape[2], None


def _video_problem(path: Path, height: int, width: int) -> tuple[int, str | None]:
    try:
        frames = _read_video(path)
    except (OSError, RuntimeError) as err:  # imageio-ffmpeg's, with ffmpeg's own words last
        said = [line.strip() for line in str(err).splitlines() if line.strip()]
        return 0, f"cannot read it as a video ({said[-1] if said else type(err).__name__})"
    if len(frames) == 0:
        return 0, "holds no video frames"
    if frames.shape[1:3] != (height, width):
        return 0, (f"frames of {frames.shape[2]}x{frames.shape[1]}; --width/--height are {width}x{height} "
                   "(a clip of another size)")
    counted = _count_video_frames(path)
    if counted != len(frames):
        return 0, (f"ffmpeg counts {counted} frames but decodes {len(frames)}; re-encode it "
                   "(e.g. ffmpeg -i IN -vsync cfr OUT.mp4)")
    return _video_latent_frames(len(frames)), None


def load_clip(cfg, vae, device) -> Clip:
    """First stage: the clip of job `cfg`; a video is encoded by `vae` (Wan's, in its own dtype)."""
    path = Path(cfg.continue_from)
    if is_latents_file(path):
        from safetensors.torch import load_file

        return Clip(load_file(str(path))[LATENTS_KEY].to(device=device, dtype=torch.float32))
    frames = _read_video(path)
    dropped = len(frames) - _kept_frames(len(frames))
    if dropped:
        log.warning("%s: %d frames are not 4k+1; its first %d are left out (the clip keeps its last frame)",
                    path, len(frames), dropped)
    frames = frames[dropped:]
    return Clip(encode_video(vae, frames, device), frames)


@torch.no_grad()
def encode_video(vae, frames: np.ndarray, device) -> torch.Tensor:
    """(n, H, W, 3) uint8 frames, n = 4k+1 -> (1, z_dim, k+1, H/8, W/8) float32 latents, normalized as the
    transformer's (the inverse of the decoder's un-normalization), from the mean of the VAE's posterior."""
    video = torch.from_numpy(np.ascontiguousarray(frames)).to(device).permute(3, 0, 1, 2)[None]
    video = (video.float() / 127.5 - 1.0).to(vae.dtype)  # as diffusers' VideoProcessor: [0, 255] -> [-1, 1]
    z = vae.encode(video).latent_dist.mode().float()
    z_dim = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean, device=z.device).view(1, z_dim, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=z.device).view(1, z_dim, 1, 1, 1)
    return (z - mean) / std


def content_digest(path: str | Path) -> str:
    """sha256 of the clip file's bytes (a resume checkpoint's fingerprint holds it, not the path)."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()


def _kept_frames(frames: int) -> int:
    """Video frames kept of `frames`: the last 4k+1."""
    return frames - (frames - 1) % TEMPORAL_FACTOR


def _video_latent_frames(frames: int) -> int:
    return (_kept_frames(frames) - 1) // TEMPORAL_FACTOR + 1


def _read_video(path: Path) -> np.ndarray:
    """Every frame of the video at `path`, (n, H, W, 3) uint8 RGB."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    width, height = reader.__next__()["size"]
    frames = [np.frombuffer(raw, np.uint8).reshape(height, width, 3) for raw in reader]
    return np.stack(frames) if frames else np.zeros((0, height, width, 3), np.uint8)


def _count_video_frames(path: str | Path) -> int:
    import imageio_ffmpeg

    return imageio_ffmpeg.count_frames_and_secs(str(path))[0]


def _shown(path: Path) -> str:
    text = str(path)
    return repr(text) if not text.isprintable() else text
