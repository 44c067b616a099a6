"""Streaming output: decode finished latent blocks with Wan's causal VAE and append them to an mp4.

A block is final once DualParal finishes it, and blocks finish in temporal order. Wan's decoder is
causal in time: each causal conv only needs the last frames of its own input (at most ``CACHE_T`` = 2),
so decoding latent frame by frame while carrying those per-conv caches across blocks yields the same
pixels as ``vae.decode`` of the whole latent video, with memory bounded by one block.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import imageio
import imageio.v3 as iio
import numpy as np
import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, unpatchify

logger = logging.getLogger(__name__)


class StreamingDecoder:
    """Decodes a latent video block by block, in order, keeping the decoder's temporal cache.

    ``decode(b0); decode(b1); ...`` concatenated along time equals ``vae.decode`` of the concatenated,
    un-normalized latents. The cache lives here, not in the VAE, so other ``vae.decode`` calls (which
    clear the VAE's own cache) do not disturb a stream in progress.
    """

    def __init__(self, vae: AutoencoderKLWan):
        # Tiled decoding blends overlapping spatial tiles of a whole video; only the plain path streams.
        assert not vae.use_tiling, "StreamingDecoder supports only the plain path: call vae.disable_tiling()"
        self.vae = vae
        z_dim = vae.config.z_dim
        self._mean = torch.tensor(vae.config.latents_mean).view(1, z_dim, 1, 1, 1)
        self._inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z_dim, 1, 1, 1)
        self._num_convs = sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())
        self.reset()

    def reset(self) -> None:
        """Forget the previous frames: the next ``decode`` starts a new video."""
        self._feat_cache: list = [None] * self._num_convs
        self.latent_frames_decoded = 0

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, z_dim, f, h, w) normalized latents of the next f frames -> (B, 3, n, H, W) in [-1, 1].

        n is 1 + 4 (f - 1) when the block starts the video, else 4 f (for Wan 2.1's 4x temporal upsampling).
        """
        vae = self.vae
        assert latents.ndim == 5 and latents.shape[1] == vae.config.z_dim, (
            f"latents must be (B, {vae.config.z_dim}, f, h, w), got {tuple(latents.shape)}"
        )
        assert latents.shape[2] >= 1, "latents must hold at least one frame"
        z = latents.to(device=vae.device, dtype=vae.dtype)
        # Same un-normalization as WanPipeline, in the same dtype and order of operations.
        z = z / self._inv_std.to(z.device, z.dtype) + self._mean.to(z.device, z.dtype)

        x = vae.post_quant_conv(z)  # kernel 1: frame-wise, needs no cache
        outs = []
        for i in range(x.shape[2]):
            outs.append(
                vae.decoder(
                    x[:, :, i : i + 1],
                    feat_cache=self._feat_cache,
                    feat_idx=[0],
                    first_chunk=self.latent_frames_decoded == 0,
                )
            )
            self.latent_frames_decoded += 1
        out = torch.cat(outs, dim=2)
        if vae.config.patch_size is not None:
            out = unpatchify(out, patch_size=vae.config.patch_size)
        return torch.clamp(out, min=-1.0, max=1.0)


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """(1, 3, n, H, W) in [-1, 1] -> (n, H, W, 3) uint8.

    As ``VideoProcessor.postprocess_video(output_type="np")`` then ``numpy_to_pil``: clamp(x / 2 + 0.5, 0, 1),
    in fp32, times 255, rounded. (diffusers' ``export_to_video`` truncates instead of rounding.)
    """
    assert video.ndim == 5 and video.shape[0] == 1 and video.shape[1] == 3, (
        f"video must be (1, 3, n, H, W), got {tuple(video.shape)}"
    )
    frames = (video[0].permute(1, 2, 3, 0).float() * 0.5 + 0.5).clamp(0, 1)
    return (frames.cpu().numpy() * 255).round().astype(np.uint8)


class Mp4Writer:
    """Appends uint8 frames to an mp4 that appears at ``path`` only when the writer closes cleanly.

    Frames go to ``.<name>.partial.mp4`` in the same folder, renamed atomically on success and deleted
    if the with-block raises, so a file at ``path`` is always a finished video.
    """

    def __init__(self, path: str | os.PathLike, fps: int, overwrite: bool = False):
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise FileExistsError(f"output {self.path} already exists; pass overwrite=True (--overwrite) to replace it")
        if fps <= 0:
            raise ValueError(f"fps must be a positive integer, got {fps}")
        self.fps = fps
        self.overwrite = overwrite
        self.partial_path = self.path.with_name(f".{self.path.stem}.partial.mp4")
        self.frames_written = 0
        self._writer = None
        self._frame_shape: tuple[int, ...] | None = None

    def __enter__(self) -> Mp4Writer:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.partial_path.unlink(missing_ok=True)  # left by a killed earlier run
        # Same encoder settings as diffusers' export_to_video (libx264, quality 5, 16-pixel macro blocks).
        self._writer = imageio.get_writer(
            self.partial_path, format="FFMPEG", mode="I", fps=self.fps, codec="libx264", quality=5.0
        )
        return self

    def append(self, frames_uint8: np.ndarray) -> None:
        """Append (n, H, W, 3) uint8 frames."""
        assert self._writer is not None, "Mp4Writer.append outside its with-block"
        assert frames_uint8.dtype == np.uint8 and frames_uint8.ndim == 4 and frames_uint8.shape[3] == 3, (
            f"frames must be (n, H, W, 3) uint8, got {frames_uint8.dtype} {frames_uint8.shape}"
        )
        if self._frame_shape is None:
            self._frame_shape = frames_uint8.shape[1:]
        assert frames_uint8.shape[1:] == self._frame_shape, (
            f"frame size changed from {self._frame_shape} to {frames_uint8.shape[1:]}"
        )
        for frame in frames_uint8:
            self._writer.append_data(frame)
        self.frames_written += len(frames_uint8)

    def __exit__(self, exc_type, exc, tb) -> None:
        writer, self._writer = self._writer, None
        try:
            writer.close()
            if exc_type is None:
                self._publish()
        finally:
            # No-op after a successful publish; otherwise nothing that looks finished is left behind.
            self.partial_path.unlink(missing_ok=True)

    def _publish(self) -> None:
        if self.frames_written == 0:
            raise RuntimeError(f"no frames were appended; {self.path} not written")
        if self.path.exists() and not self.overwrite:
            raise FileExistsError(f"output {self.path} appeared while writing; pass overwrite=True to replace it")
        os.replace(self.partial_path, self.path)
        logger.info("wrote %s (%d frames at %d fps)", self.path, self.frames_written, self.fps)


def save_frames(dir: str | os.PathLike, frames_uint8: np.ndarray, start_index: int) -> list[Path]:
    """Write (n, H, W, 3) uint8 frames as ``frame_%06d.png`` numbered from ``start_index``."""
    out_dir = Path(dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for offset, frame in enumerate(frames_uint8):
        path = out_dir / f"frame_{start_index + offset:06d}.png"
        iio.imwrite(path, frame)
        paths.append(path)
    return paths
