"""The embedded tiny Wan checkpoint (trained by launch/train_tiny.py): loads in diffusers, is sharded, and
holds the trained weights; `write_tiny_wan` still writes the random test model (tests/test_toyvideo.py)."""

import json

import numpy as np
import pytest
import torch
from diffusers import WanPipeline
from safetensors.torch import load_file
from transformers import AutoTokenizer

from ds_dualparal.config import WAN22_BOUNDARY_RATIO
from ds_dualparal.toy.tiny import main
from ds_dualparal.wan.weights import TINY_WAN_PATH

INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


def _transformer_tensors(folder):
    index = json.loads((folder / INDEX_NAME).read_text())
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(folder / shard))
    assert set(tensors) == set(index["weight_map"])
    return tensors


@pytest.fixture(scope="module")
def committed_pipe():
    return WanPipeline.from_pretrained(TINY_WAN_PATH)


@pytest.fixture(scope="module")
def two_expert_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-wan-2x")
    assert main([str(path), "--two-experts"]) == 0
    return path


def test_committed_checkpoint_runs_full_pipeline(committed_pipe):
    video = committed_pipe(
        prompt="a cat",
        num_frames=5,
        height=32,
        width=32,
        num_inference_steps=2,
        guidance_scale=5.0,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).frames
    assert video.shape == (1, 5, 32, 32, 3)
    assert np.isfinite(video).all()


def test_committed_checkpoint_config(committed_pipe):
    cfg = committed_pipe.transformer.config
    assert cfg.text_dim == committed_pipe.text_encoder.config.d_model
    assert committed_pipe.transformer_2 is None
    assert committed_pipe.config.boundary_ratio is None
    assert committed_pipe.scheduler.config.prediction_type == "flow_prediction"
    assert committed_pipe.scheduler.config.use_flow_sigmas
    assert committed_pipe.scheduler.config.flow_shift == 3.0
    assert all(p.dtype == torch.float32 for p in committed_pipe.components["transformer"].parameters())


# diffusers 0.42 renamed torch_dtype to dtype; callers still use both.
@pytest.mark.filterwarnings("ignore:`torch_dtype` is deprecated:FutureWarning")
@pytest.mark.parametrize("dtype_kwarg", ["torch_dtype", "dtype"])
def test_loads_with_fp32_dtype(dtype_kwarg):
    pipe = WanPipeline.from_pretrained(TINY_WAN_PATH, **{dtype_kwarg: torch.float32})
    for name in ("transformer", "vae", "text_encoder"):
        assert all(p.dtype == torch.float32 for p in getattr(pipe, name).parameters()), name


def test_transformer_is_sharded_with_index():
    folder = TINY_WAN_PATH / "transformer"
    index = json.loads((folder / INDEX_NAME).read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 2
    assert all((folder / shard).is_file() for shard in shards)
    assert not (folder / "diffusion_pytorch_model.safetensors").exists()


def test_vae_compresses_time_by_4_and_space_by_8(committed_pipe):
    latent_frames = 3
    z = torch.randn(1, 16, latent_frames, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        video = committed_pipe.vae.decode(z).sample
    assert video.shape == (1, 3, 4 * (latent_frames - 1) + 1, 32, 32)


def test_tokenizer_handles_any_prompt():
    tokenizer = AutoTokenizer.from_pretrained(TINY_WAN_PATH / "tokenizer")
    out = tokenizer(
        ["a cat", "zyzzyva 日本語 !!"],
        padding="max_length",
        max_length=512,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    assert out.input_ids.shape == (2, 512)
    cat_ids = out.input_ids[0, : int(out.attention_mask[0].sum())].tolist()
    assert tokenizer.unk_token_id not in cat_ids
    assert cat_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id in out.input_ids[1].tolist()
    assert (out.input_ids[0, len(cat_ids) :] == tokenizer.pad_token_id).all()
    long_ids = tokenizer("cat " * 1000, max_length=512, truncation=True).input_ids
    assert len(long_ids) == 512


def test_committed_checkpoint_is_the_trained_one(committed_pipe):
    """launch/train_tiny.py wrote it: its log is beside the weights, and the VAE carries the latent
    statistics it measured (the random model had diffusers' defaults of Wan's real VAE)."""
    log = json.loads((TINY_WAN_PATH / "training_log.json").read_text())
    assert log["vae"]["steps"] > 0 and log["dit"]["steps"] > 0
    mean, std = committed_pipe.vae.config.latents_mean, committed_pipe.vae.config.latents_std
    assert len(mean) == len(std) == committed_pipe.vae.config.z_dim
    assert all(0.05 < s < 5 for s in std)
    size = sum(f.stat().st_size for f in TINY_WAN_PATH.rglob("*.safetensors"))
    assert size <= 20 * 2**20, size


def test_two_experts_differ_and_load(two_expert_path):
    first = _transformer_tensors(two_expert_path / "transformer")
    second = _transformer_tensors(two_expert_path / "transformer_2")
    assert first.keys() == second.keys()
    assert not torch.equal(first["blocks.0.attn1.to_q.weight"], second["blocks.0.attn1.to_q.weight"])
    assert json.loads((two_expert_path / "model_index.json").read_text())["boundary_ratio"] == WAN22_BOUNDARY_RATIO

    pipe = WanPipeline.from_pretrained(two_expert_path)
    assert pipe.transformer_2 is not None
    assert pipe.config.boundary_ratio == WAN22_BOUNDARY_RATIO
    # Two steps straddle the boundary (t=999 then t<875), so both experts run.
    video = pipe(
        prompt="a cat",
        num_frames=5,
        height=32,
        width=32,
        num_inference_steps=2,
        guidance_scale=5.0,
        output_type="np",
    ).frames
    assert video.shape == (1, 5, 32, 32, 3)
    assert np.isfinite(video).all()
