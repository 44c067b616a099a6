"""Finished blocks decoded beside the pipeline: the same frames, in order, and failures reach the caller."""

import copy

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan

from ds_dualparal.output.stream import BlockOutput
from ds_dualparal.output.video import StreamingDecoder, to_uint8_frames


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    model = AutoencoderKLWan(base_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1, z_dim=16,
                             temperal_downsample=[False, True, True])
    with torch.no_grad():  # random init decodes to near zero; scaled so the output spans the range
        for p in model.decoder.parameters():
            p.mul_(1.5)
    return model.eval()


def _blocks():
    latents = torch.randn(1, 16, 7, 4, 4, generator=torch.Generator().manual_seed(1))
    return latents.split([3, 2, 2], dim=2)


def test_worker_writes_the_frames_of_a_synchronous_streaming_decode_in_order(vae):
    blocks = _blocks()
    want_decoder = StreamingDecoder(vae)
    want = np.concatenate([to_uint8_frames(want_decoder.decode(block)) for block in blocks])
    got, firsts = [], []
    output = BlockOutput(StreamingDecoder(vae), [lambda frames, first: (got.append(frames), firsts.append(first))],
                         torch.device("cpu"))
    for b, block in enumerate(blocks):
        output.submit(b, block)
    output.close()
    assert np.array_equal(np.concatenate(got), want)
    assert output.frames_written == len(want) == 1 + 4 * 6
    assert firsts == [0, 9, 17]  # each sink call knows the index of its first frame


def test_an_inline_decode_writes_the_same_frames(vae):
    """`inline` (one stage on CUDA): the caller decodes at submit, the worker only writes; frames and indices as
    the worker's decode gives them, and the clip's own frames still replace a block's."""
    blocks = _blocks()
    want_decoder = StreamingDecoder(vae)
    want = [to_uint8_frames(want_decoder.decode(block)) for block in blocks]
    own = np.full_like(want[0], 7)
    got, firsts = [], []
    output = BlockOutput(StreamingDecoder(vae), [lambda frames, first: (got.append(frames), firsts.append(first))],
                         torch.device("cpu"), inline=True)
    output.submit(0, blocks[0], frames=own)
    for b, block in enumerate(blocks[1:], start=1):
        output.submit(b, block)
    output.close()
    assert output.decoder.latent_frames_decoded == 7  # the clip's latents went through the decoder too
    assert np.array_equal(got[0], own) and all(np.array_equal(g, w) for g, w in zip(got[1:], want[1:]))
    assert firsts == [0, 9, 17]


def test_a_failing_sink_fails_the_caller_and_stops_writing(vae):
    calls = []

    def disk_full(frames, first):
        calls.append(first)
        raise OSError(28, "No space left on device")

    output = BlockOutput(StreamingDecoder(vae), [disk_full], torch.device("cpu"))
    blocks = _blocks()
    output.submit(0, blocks[0])
    output._worker.join(timeout=0)  # nothing to wait for: the error surfaces at the next call either way
    with pytest.raises(OSError, match="No space left"):
        for b, block in enumerate(blocks[1:], start=1):
            output.submit(b, block)
        output.close()
    assert calls == [0]  # blocks after the failure are not written


def test_bf16_vae_is_within_a_few_levels_of_fp32(vae):
    """The bf16 decoder option: frames within 2 levels (of 255) on average and 12 at most on this model
    (the full-size Wan2.1 VAE on an H200: 0.72 mean, 6 max, BENCHMARKS.md)."""
    low = copy.deepcopy(vae).to(torch.bfloat16)
    latents = torch.cat(_blocks(), dim=2)
    fp32 = to_uint8_frames(StreamingDecoder(vae).decode(latents)).astype(int)
    bf16 = to_uint8_frames(StreamingDecoder(low).decode(latents)).astype(int)
    diff = np.abs(fp32 - bf16)
    assert fp32.std() > 20  # the frames are not flat: the bound means something
    assert diff.mean() <= 2.0 and diff.max() <= 12
