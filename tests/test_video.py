import copy
import subprocess
import sys
import time

import imageio
import imageio.v3 as iio
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.video_processor import VideoProcessor

from ds_dualparal.files import OutputError
from ds_dualparal.output.video import (
    Mp4Writer,
    StreamingDecoder,
    save_frames,
    to_memory_format,
    to_uint8_frames,
)

# Wan 2.1's VAE, and Wan 2.2's (residual up blocks whose first_chunk handling matters, 2x2 patches).
VAE_FLAVOURS = {
    "wan2.1": dict(z_dim=16),
    "wan2.2": dict(
        z_dim=48, decoder_base_dim=16, is_residual=True, patch_size=2, in_channels=12, out_channels=12,
        scale_factor_spatial=16,
    ),
}


@pytest.fixture(scope="module", params=list(VAE_FLAVOURS))
def vae(request):
    flavour = VAE_FLAVOURS[request.param]
    z_dim = flavour["z_dim"]
    torch.manual_seed(0)
    model = AutoencoderKLWan(
        base_dim=8,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=torch.linspace(-1.0, 1.0, z_dim).tolist(),
        latents_std=torch.linspace(0.5, 3.0, z_dim).tolist(),
        **flavour,
    )
    # Random init leaves outputs near zero; scale weights so the clamp and all cache paths matter.
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.mul_(1.5)
    return model.eval()


def _latents(vae, frames, seed=1):
    return torch.randn(1, vae.config.z_dim, frames, 2, 2, generator=torch.Generator().manual_seed(seed))


def _whole_decode(vae, latents):
    """WanPipeline's un-normalization followed by a one-shot vae.decode."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape)
    with torch.no_grad():
        return vae.decode(latents / inv_std + mean).sample


def _stream(decoder, latents, split):
    return [decoder.decode(block) for block in torch.split(latents, split, dim=2)]


@pytest.mark.parametrize("split", [[3, 2, 1], [1, 5], [1, 1, 1, 1, 1, 1], [6]])
def test_streaming_decode_equals_whole_decode(vae, split):
    latents = _latents(vae, 6)
    expected = _whole_decode(vae, latents)
    assert expected.shape[:3] == (1, 3, 4 * (6 - 1) + 1)
    assert expected.abs().max() == 1.0  # the clamp is exercised

    parts = _stream(StreamingDecoder(vae), latents, split)

    assert [p.shape[2] for p in parts] == [1 + 4 * (split[0] - 1)] + [4 * f for f in split[1:]]
    torch.testing.assert_close(torch.cat(parts, dim=2), expected, atol=1e-5, rtol=0)


def test_streaming_decode_differs_from_decoding_blocks_independently(vae):
    # Guards the test above: without the carried cache, block boundaries would show.
    latents = _latents(vae, 6)
    decoder = StreamingDecoder(vae)
    streamed = torch.cat(_stream(decoder, latents, [3, 3]), dim=2)
    decoder.reset()
    decoder.decode(latents[:, :, :3])
    decoder.reset()
    fresh_second = decoder.decode(latents[:, :, 3:])
    assert fresh_second.shape[2] == 1 + 4 * 2
    assert not torch.allclose(fresh_second[:, :, -8:], streamed[:, :, -8:], atol=1e-3)


def test_reset_starts_a_new_video_and_vae_decode_does_not_disturb_stream(vae):
    first, second = _latents(vae, 4, seed=2), _latents(vae, 5, seed=3)
    decoder = StreamingDecoder(vae)
    _stream(decoder, first, [2, 2])
    decoder.reset()

    head = decoder.decode(second[:, :, :2])
    _whole_decode(vae, first)  # clears the VAE's own cache, not the stream's
    tail = decoder.decode(second[:, :, 2:])

    torch.testing.assert_close(torch.cat([head, tail], dim=2), _whole_decode(vae, second), atol=1e-5, rtol=0)
    assert decoder.latent_frames_decoded == 5


def test_cache_stays_bounded_with_video_length(vae):
    decoder = StreamingDecoder(vae)
    for block in torch.split(_latents(vae, 9), 3, dim=2):
        decoder.decode(block)
    cached = [c for c in decoder._feat_cache if isinstance(c, torch.Tensor)]
    assert cached and all(c.shape[2] <= 2 for c in cached)


def _strictly(tensor, fmt):
    """In memory format `fmt` and not also plain contiguous (as a tensor with size-1 dims can be both)."""
    return tensor.is_contiguous(memory_format=fmt) and not tensor.is_contiguous()


def _convs(module, kind):
    """`module`'s convs of class `kind` with a kernel wider than 1 (a 1x1 kernel's weight is both formats)."""
    return [m for m in module.modules() if isinstance(m, kind) and m.kernel_size[-1] > 1]


def test_channels_last_decodes_as_contiguous_within_one_level(vae):
    latents = _latents(vae, 6)
    plain = torch.cat(_stream(StreamingDecoder(vae, channels_last=False), latents, [3, 3]), dim=2)

    converted = copy.deepcopy(vae)  # the fixture is shared: the decoder converts its VAE in place
    decoder = StreamingDecoder(converted, channels_last=True)
    inputs = []
    hook = converted.post_quant_conv.register_forward_pre_hook(
        lambda module, args: inputs.append(_strictly(args[0], torch.channels_last_3d)))
    try:
        fast = torch.cat(_stream(decoder, latents, [3, 3]), dim=2)  # two blocks: through the temporal cache
    finally:
        hook.remove()

    assert inputs == [True, True]  # each block's latents went in channels-last
    assert fast.shape == plain.shape == (1, 3, 1 + 4 * 5, *plain.shape[3:])
    levels = np.abs(to_uint8_frames(fast).astype(int) - to_uint8_frames(plain).astype(int))
    assert levels.max() <= 1


def test_channels_last_converts_the_conv_weights_in_place(vae):
    converted = copy.deepcopy(vae)
    StreamingDecoder(converted, channels_last=True)

    conv3d, conv2d = _convs(converted, torch.nn.Conv3d), _convs(converted, torch.nn.Conv2d)
    assert conv3d and conv2d  # the Wan VAE has both (Conv2d: the spatial upsamplers)
    assert all(_strictly(m.weight, torch.channels_last_3d) for m in conv3d)
    assert all(_strictly(m.weight, torch.channels_last) for m in conv2d)
    assert any(_strictly(m.weight, torch.channels_last_3d) for m in _convs(converted.encoder, torch.nn.Conv3d))
    for (name, before), after in zip(vae.named_parameters(), converted.parameters()):
        assert torch.equal(before, after), name  # the values are the same, only their order in memory
    assert all(p.is_contiguous() for p in vae.parameters())  # the copy's, not the original's

    to_memory_format(converted, torch.contiguous_format)
    assert all(m.weight.is_contiguous() for m in conv3d + conv2d)


def test_channels_last_is_off_by_default_on_the_cpu(vae):
    own = copy.deepcopy(vae)
    decoder = StreamingDecoder(own)

    assert decoder.channels_last is False
    assert all(p.is_contiguous() for p in own.parameters())
    decoder.decode(_latents(vae, 2))
    assert all(p.is_contiguous() for p in own.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_channels_last_is_on_by_default_on_cuda(vae):
    own = copy.deepcopy(vae).cuda()
    decoder = StreamingDecoder(own)

    assert decoder.channels_last is True
    assert all(_strictly(m.weight, torch.channels_last_3d) for m in _convs(own, torch.nn.Conv3d))
    latents = _latents(vae, 6)
    fast = torch.cat(_stream(decoder, latents.cuda(), [3, 3]), dim=2).cpu()
    plain = torch.cat(_stream(StreamingDecoder(vae, channels_last=False), latents, [3, 3]), dim=2)
    levels = np.abs(to_uint8_frames(fast).astype(int) - to_uint8_frames(plain).astype(int))
    assert levels.max() <= 1


def test_vae_encode_is_unchanged_by_the_channels_last_weights(vae):
    # The engine's VAE also encodes (a clip to continue, an image condition), on weights the decoder converted.
    video = torch.rand(1, 3, 5, 32, 32, generator=torch.Generator().manual_seed(4)) * 2 - 1
    converted = to_memory_format(copy.deepcopy(vae), torch.channels_last_3d)
    with torch.no_grad():
        want = vae.encode(video).latent_dist.mode()
        got = converted.encode(video).latent_dist.mode()

    assert got.shape == want.shape and want.abs().max() > 0.1
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_to_uint8_frames_matches_diffusers_postprocess():
    video = torch.rand(1, 3, 5, 8, 12, generator=torch.Generator().manual_seed(0)) * 2.4 - 1.2
    ours = to_uint8_frames(video)

    reference = VideoProcessor().postprocess_video(video, output_type="np")[0]
    reference = (reference * 255).round().astype(np.uint8)

    assert ours.shape == (5, 8, 12, 3) and ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, reference)
    assert ours.min() == 0 and ours.max() == 255


def _frames(n, h=64, w=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


def _read_mp4(path):
    with imageio.get_reader(path, format="FFMPEG") as reader:
        return np.stack([frame for frame in reader.iter_data()]), reader.get_meta_data()


def test_mp4_writer_writes_all_frames_atomically(tmp_path):
    path = tmp_path / "out" / "video.mp4"
    with Mp4Writer(path, fps=8) as writer:
        writer.append(_frames(1))
        writer.append(_frames(4, seed=1))
        assert not path.exists()
        writer.append(_frames(4, seed=2))
    assert writer.frames_written == 9

    frames, meta = _read_mp4(path)
    assert frames.shape == (9, 64, 64, 3)
    assert meta["fps"] == 8
    assert sorted(p.name for p in path.parent.iterdir()) == ["video.mp4"]


def test_mp4_writer_keeps_smooth_content(tmp_path):
    # Lossy codec: a flat grey frame survives nearly unchanged, so frames are not scrambled or reordered.
    levels = np.array([40, 120, 200], dtype=np.uint8)
    frames = np.broadcast_to(levels[:, None, None, None], (3, 64, 64, 3)).copy()
    with Mp4Writer(tmp_path / "grey.mp4", fps=4) as writer:
        writer.append(frames)
    read, _ = _read_mp4(tmp_path / "grey.mp4")
    np.testing.assert_allclose(read.reshape(3, -1).mean(axis=1), levels, atol=3)


def test_mp4_writer_refuses_existing_output_unless_overwrite(tmp_path):
    path = tmp_path / "video.mp4"
    path.write_bytes(b"finished earlier")
    with pytest.raises(FileExistsError, match="overwrite"):
        Mp4Writer(path, fps=8)
    assert path.read_bytes() == b"finished earlier"

    with Mp4Writer(path, fps=8, overwrite=True) as writer:
        writer.append(_frames(2))
    assert _read_mp4(path)[0].shape[0] == 2


def _wait_for(path, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def test_mp4_writer_exception_leaves_no_file(tmp_path):
    path = tmp_path / "video.mp4"
    with pytest.raises(KeyError):
        with Mp4Writer(path, fps=8) as writer:
            writer.append(_frames(3))
            _wait_for(writer.partial_path)  # ffmpeg creates it asynchronously; cleanup must remove it
            raise KeyError("boom")
    assert list(tmp_path.iterdir()) == []


def test_mp4_writer_without_frames_raises_and_leaves_no_file(tmp_path):
    with pytest.raises(RuntimeError, match="no frames"):
        with Mp4Writer(tmp_path / "video.mp4", fps=8):
            pass
    assert list(tmp_path.iterdir()) == []


def test_mp4_writer_rejects_bad_fps(tmp_path):
    with pytest.raises(ValueError, match="fps"):
        Mp4Writer(tmp_path / "video.mp4", fps=0)


def test_save_frames_numbers_pngs_from_start_index(tmp_path):
    frames = _frames(3, h=8, w=16)
    paths = save_frames(tmp_path / "frames", frames, start_index=5)
    assert [p.name for p in paths] == ["frame_000005.png", "frame_000006.png", "frame_000007.png"]
    for path, frame in zip(paths, frames):
        np.testing.assert_array_equal(iio.imread(path), frame)


DISK_FULL = """
import resource, signal, sys
import numpy as np
from ds_dualparal.files import OutputError
from ds_dualparal.output.video import Mp4Writer
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
frames = np.random.default_rng(0).integers(0, 256, size=(8, 64, 64, 3), dtype=np.uint8)
try:
    with Mp4Writer(sys.argv[1], fps=16) as writer:
        for _ in range(50):  # 400 frames of noise: far more than 200 KB
            writer.append(frames)
except OSError as err:
    print(type(err).__name__, err)
    sys.exit(3)
"""


def test_a_write_error_of_the_encoder_raises_and_leaves_nothing(tmp_path):
    """ffmpeg fails on a full disk (here: a file size limit); the video must not look finished."""
    result = subprocess.run([sys.executable, "-c", DISK_FULL, str(tmp_path / "v.mp4")], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 3, result.stdout + result.stderr
    assert result.stdout.startswith(f"OutputError cannot write {tmp_path / 'v.mp4'}: ")
    assert len(result.stdout.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_an_encoder_that_exits_non_zero_fails_the_writer(tmp_path, monkeypatch):
    fake = tmp_path / "ffmpeg"
    fake.write_text("#!/bin/sh\ncat > /dev/null\necho 'av_interleaved_write_frame(): No space left on device' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr("imageio_ffmpeg.get_ffmpeg_exe", lambda: str(fake))
    out = tmp_path / "out"
    with pytest.raises(OutputError, match=f"cannot write {out / 'v.mp4'}: .*No space left on device"):
        with Mp4Writer(out / "v.mp4", fps=8) as writer:
            writer.append(_frames(2))
    assert list(out.iterdir()) == []


def test_mp4_writer_checks_its_input_without_assert(tmp_path):
    with Mp4Writer(tmp_path / "v.mp4", fps=8) as writer:
        for bad in (_frames(1).astype(np.float32), _frames(1)[0], np.zeros((1, 8, 8, 4), np.uint8)):
            with pytest.raises(ValueError, match=r"frames must be \(n, H, W, 3\) uint8"):
                writer.append(bad)
        writer.append(_frames(1))
        with pytest.raises(ValueError, match="frame size changed"):
            writer.append(_frames(1, h=32))
    with pytest.raises(RuntimeError, match="outside its with-block"):
        writer.append(_frames(1))
    with pytest.raises(ValueError, match="fps"):
        Mp4Writer(tmp_path / "w.mp4", fps=True)
