"""Streaming output: decode finished latent blocks with Wan's causal VAE and append them to an mp4.

A block is final once DualParal finishes it, and blocks finish in temporal order. Wan's decoder is
causal in time: each causal conv only needs the last frames of its own input (at most ``CACHE_T`` = 2),
so decoding latent frame by frame while carrying those per-conv caches across blocks yields the same
pixels as ``vae.decode`` of the whole latent video, with memory bounded by one block.
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, unpatchify

from ..files import OutputError, atomic_output

logger = logging.getLogger(__name__)
MACRO_BLOCK = 16


def to_memory_format(vae: torch.nn.Module, fmt: torch.memory_format) -> torch.nn.Module:
    """Puts the VAE's conv weights in memory format ``fmt``, in place; returns the VAE.

    ``fmt`` is ``torch.channels_last_3d`` or ``torch.contiguous_format``. Conv3d weights (5-D) take
    ``fmt``; Conv2d weights (4-D: the spatial upsamplers', the attention's) take its 2-D match
    (``torch.channels_last``). ``vae.to(memory_format=torch.channels_last_3d)`` refuses the 4-D
    weights, hence one module at a time. A weight already in ``fmt`` is left as it is, so converting
    twice costs nothing. The values do not change, only their order in memory.
    """
    if fmt not in (torch.channels_last_3d, torch.contiguous_format):
        raise ValueError(f"fmt must be torch.channels_last_3d or torch.contiguous_format, got {fmt}")
    fmt2d = torch.channels_last if fmt == torch.channels_last_3d else fmt
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, (torch.nn.Conv3d, torch.nn.Conv2d)):
                weight = module.weight
                weight.data = weight.data.contiguous(memory_format=fmt if weight.dim() == 5 else fmt2d)
    return vae


class StreamingDecoder:
    """Decodes a latent video block by block, in order, keeping the decoder's temporal cache.

    ``decode(b0); decode(b1); ...`` concatenated along time equals ``vae.decode`` of the concatenated,
    un-normalized latents. The cache lives here, not in the VAE, so other ``vae.decode`` calls (which
    clear the VAE's own cache) do not disturb a stream in progress.

    ``channels_last``: decode in channels-last memory format, the layout cuDNN's convolutions prefer.
    It converts the VAE's conv weights in place (``to_memory_format``; the VAE's other users, its
    encoder included, then run on those weights too, with the same results up to rounding) and each
    block's latents as they come in; the decoder's activations then keep that layout where the conv
    kernels do. On one H200 this decoded a 480x832 block 8-11% faster with 17-23% less extra memory,
    at most one uint8 level off (BENCHMARKS.md, "Without DeepSpeed's launcher, and decoder variants").
    ``None``, the default: on when the VAE is on a CUDA device; off on the CPU, where it was not
    measured to help. Off leaves the VAE's weights as they are.
    """

    def __init__(self, vae: AutoencoderKLWan, channels_last: bool | None = None):
        # Tiled decoding blends overlapping spatial tiles of a whole video; only the plain path streams.
        if vae.use_tiling:
            raise ValueError("StreamingDecoder supports only the plain path: call vae.disable_tiling()")
        self.vae = vae
        self.channels_last = vae.device.type == "cuda" if channels_last is None else channels_last
        if self.channels_last:
            to_memory_format(vae, torch.channels_last_3d)
        z_dim = vae.config.z_dim
        # on the VAE's device and in its dtype once (it must be there already), not copied per block
        self._mean = torch.tensor(vae.config.latents_mean).view(1, z_dim, 1, 1, 1).to(vae.device, vae.dtype)
        self._inv_std = (1.0 / torch.tensor(vae.config.latents_std).view(1, z_dim, 1, 1, 1)).to(vae.device, vae.dtype)
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
        if latents.ndim != 5 or latents.shape[1] != vae.config.z_dim or latents.shape[2] < 1:
            raise ValueError(f"latents must be (B, {vae.config.z_dim}, f >= 1, h, w), got {tuple(latents.shape)}")
        z = latents.to(device=vae.device, dtype=vae.dtype)
        if self.channels_last:  # as the measured variant: the latents, and so post_quant_conv's output
            z = z.contiguous(memory_format=torch.channels_last_3d)
        # Same un-normalization as WanPipeline, in the same dtype and order of operations.
        z = z / self._inv_std + self._mean

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
    return uint8_frames(video).cpu().numpy()


def uint8_frames(video: torch.Tensor) -> torch.Tensor:
    """`to_uint8_frames` on the video's device: (n, H, W, 3) uint8, the same values (fp32, round half to even)."""
    if video.ndim != 5 or video.shape[0] != 1 or video.shape[1] != 3:
        raise ValueError(f"video must be (1, 3, n, H, W), got {tuple(video.shape)}")
    frames = (video[0].permute(1, 2, 3, 0).float() * 0.5 + 0.5).clamp(0, 1)
    return (frames * 255).round().to(torch.uint8)


class Mp4Writer:
    """Appends uint8 frames to an mp4 that appears at ``path`` only when the writer closes cleanly.

    Frames go to a temporary name unique to this writer in the same folder (``files.atomic_output``),
    piped to an ffmpeg process (libx264, crf 25, yuv420p: what imageio's writer and diffusers'
    ``export_to_video`` use). The file is renamed onto ``path`` only if ffmpeg took every frame and
    exited with status 0; a write error (disk full, ...) raises ``OutputError`` naming the path and
    ffmpeg's reason, and nothing is left at ``path``.
    """

    def __init__(self, path: str | os.PathLike, fps: int, overwrite: bool = False):
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise FileExistsError(f"output {self.path} already exists; pass overwrite=True (--overwrite) to replace it")
        if isinstance(fps, bool) or not isinstance(fps, int) or fps <= 0:
            raise ValueError(f"fps must be a positive integer, got {fps!r}")
        self.fps = fps
        self.overwrite = overwrite
        self.partial_path: Path | None = None
        self.frames_written = 0
        self._output = None
        self._process: subprocess.Popen | None = None
        self._stderr = None
        self._frame_shape: tuple[int, ...] | None = None

    def __enter__(self) -> Mp4Writer:
        self._output = atomic_output(self.path, overwrite=self.overwrite)
        self.partial_path = self._output.__enter__()
        return self

    def append(self, frames_uint8: np.ndarray) -> None:
        """Append (n, H, W, 3) uint8 frames."""
        if self._output is None:
            raise RuntimeError("Mp4Writer.append outside its with-block")
        if not (isinstance(frames_uint8, np.ndarray) and frames_uint8.dtype == np.uint8 and frames_uint8.ndim == 4
                and frames_uint8.shape[3] == 3 and frames_uint8.shape[1] > 0 and frames_uint8.shape[2] > 0):
            raise ValueError(f"frames must be (n, H, W, 3) uint8, got {getattr(frames_uint8, 'dtype', None)} "
                             f"{getattr(frames_uint8, 'shape', None)}")
        if self._frame_shape is None:
            self._frame_shape = frames_uint8.shape[1:]
            self._start(*self._frame_shape[:2])
        if frames_uint8.shape[1:] != self._frame_shape:
            raise ValueError(f"frame size changed from {self._frame_shape} to {frames_uint8.shape[1:]}")
        try:
            self._process.stdin.write(np.ascontiguousarray(frames_uint8).tobytes())
        except OSError:  # ffmpeg quit (disk full, ...): its own words say why
            self._process.kill()
            self._process.wait()
            raise self._failure() from None
        self.frames_written += len(frames_uint8)

    def _start(self, height: int, width: int) -> None:
        import imageio_ffmpeg  # here, not at import: decoding and frames need no encoder (GPU machines lack it)

        command = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-f", "rawvideo", "-vcodec", "rawvideo",
                   "-s", f"{width}x{height}", "-pix_fmt", "rgb24", "-r", str(self.fps), "-i", "-", "-an",
                   "-vcodec", "libx264", "-pix_fmt", "yuv420p", "-crf", "25"]
        if height % MACRO_BLOCK or width % MACRO_BLOCK:  # as imageio: round up to whole macro blocks
            up = lambda n: -(-n // MACRO_BLOCK) * MACRO_BLOCK  # noqa: E731
            command += ["-vf", f"scale={up(width)}:{up(height)}"]
        command += ["-v", "error", "-f", "mp4", str(self.partial_path)]
        self._stderr = tempfile.TemporaryFile()
        self._process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                         stderr=self._stderr)

    def _failure(self) -> OutputError:
        self._stderr.seek(0)
        said = [line.strip() for line in self._stderr.read().decode(errors="replace").splitlines() if line.strip()]
        reason = said[-1] if said else f"ffmpeg exited with status {self._process.returncode}"
        return OutputError(f"cannot write {self.path}: {reason}")

    def _finish(self) -> None:
        """Ends ffmpeg; raises OutputError unless it wrote the whole file."""
        process, self._process = self._process, None
        try:
            process.stdin.close()
        except OSError:
            pass
        if process.wait() != 0:
            self._process = process
            raise self._failure()

    def __exit__(self, exc_type, exc, tb) -> None:
        output, self._output = self._output, None
        try:
            if self._process is not None:
                if exc_type is None:
                    self._finish()
                else:
                    self._process.kill()
                    self._process.wait()
            if exc_type is None and self.frames_written == 0:
                raise RuntimeError(f"no frames were appended; {self.path} not written")
        except BaseException as err:
            output.__exit__(type(err), err, err.__traceback__)
            raise
        finally:
            if self._stderr is not None:
                self._stderr.close()
                self._stderr = None
        output.__exit__(exc_type, exc, tb)  # renames onto the final name, or removes the temporary
        if exc_type is None:
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
