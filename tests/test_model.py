"""Stage layers against diffusers' WanTransformer3DModel, the feature-cache attention, per-stage loading."""

import pytest
import torch
import torch.nn.functional as F
from conftest import RANDOM_TINY
from diffusers import WanTransformer3DModel

from ds_dualparal.pipeline.estimate import feature_cache_bytes
from ds_dualparal.wan.model import (
    AttentionWindow,
    Conditioner,
    FeatureCache,
    WanBlockLayer,
    WanConfig,
    WindowState,
    apply_rotary,
    layer_specs,
)
from ds_dualparal.wan.weights import (
    FolderWeights,
    ModelError,
    RandomWeights,
    SafetensorsFolder,
)

TRANSFORMER = RANDOM_TINY / "transformer"  # the counts and shapes below are its


@pytest.fixture(scope="module")
def wan():
    return WanConfig.from_json(TRANSFORMER / "config.json")


@pytest.fixture(scope="module")
def stage_model(wan):
    weights = FolderWeights(TRANSFORMER, torch.float32, "cpu")
    return Conditioner(wan, weights), [spec.build() for spec in layer_specs(wan, weights)]


@pytest.fixture(scope="module")
def diffusers_model():
    return WanTransformer3DModel.from_pretrained(TRANSFORMER).eval()


def run_layers(conditioner, layers, latents, timestep, text, guidance=None, frames=None):
    _, _, f, h, w = latents.shape
    temb, timestep_proj, projected = conditioner.embed(timestep, text)
    state = WindowState(
        block=0, grid=(f, h // 2, w // 2), own_frames=frames or f, guidance=guidance, temb=temb,
        timestep_proj=timestep_proj, text=projected, rope=conditioner.rotary(f, h // 2, w // 2, "cpu"),
        cache=FeatureCache(), latents=latents,
    )
    with torch.no_grad():
        for layer in layers:
            state = layer(state)
    return state.pred


def test_stage_layers_equal_diffusers_forward(stage_model, diffusers_model):
    torch.manual_seed(0)
    latents, text = torch.randn(1, 16, 3, 8, 12), torch.randn(1, 512, 32)
    timestep = torch.tensor([741.0])
    with torch.no_grad():
        want = diffusers_model(latents, timestep, text, return_dict=False)[0]
    got = run_layers(*stage_model, latents, timestep, text)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_head_combines_cfg_like_wan_pipeline(stage_model, diffusers_model):
    torch.manual_seed(1)
    latents, cond, uncond = torch.randn(1, 16, 2, 8, 8), torch.randn(1, 512, 32), torch.randn(1, 512, 32)
    timestep = torch.tensor([500.0])
    with torch.no_grad():
        c = diffusers_model(latents, timestep, cond, return_dict=False)[0]
        u = diffusers_model(latents, timestep, uncond, return_dict=False)[0]
    got = run_layers(*stage_model, latents.expand(2, -1, -1, -1, -1), timestep.expand(2), torch.cat([cond, uncond]), 4.0)
    torch.testing.assert_close(got, u + 4.0 * (c - u), rtol=1e-5, atol=1e-5)


def test_head_predicts_only_the_blocks_own_frames(stage_model, diffusers_model):
    torch.manual_seed(2)
    latents, text = torch.randn(1, 16, 4, 8, 8), torch.randn(1, 512, 32)
    timestep = torch.tensor([300.0])
    with torch.no_grad():
        want = diffusers_model(latents, timestep, text, return_dict=False)[0]
    got = run_layers(*stage_model, latents, timestep, text, frames=3)
    assert got.shape == (1, 16, 3, 8, 8)
    torch.testing.assert_close(got, want[:, :, 1:], rtol=1e-6, atol=1e-6)


def test_window_attention_attends_to_cached_frames_at_following_positions(wan):
    """Keys = window tokens then cached tokens (raw k, v normed after, RoPE at |X|..|X|+c-1)."""
    torch.manual_seed(3)
    layer = WanBlockLayer(wan, 0, RandomWeights(0, torch.float32, "cpu"))
    attn = layer.attn1
    conditioner = Conditioner(wan, RandomWeights(0, torch.float32, "cpu"))
    hw, frames, cached = 4, 3, 2
    x, y = torch.randn(2, frames * hw, wan.inner_dim), torch.randn(2, cached * hw, wan.inner_dim)
    rope = conditioner.rotary(frames + cached, 2, 2, "cpu")
    window = AttentionWindow(rope=rope, cached=y, capture=slice(hw, 2 * hw))
    with torch.no_grad():
        got = attn(x, None, None, window)
        heads = lambda t: t.unflatten(2, (attn.heads, -1))  # noqa: E731
        xy = torch.cat([x, y], dim=1)
        q = apply_rotary(heads(attn.norm_q(attn.to_q(x))), rope[0][:, : frames * hw], rope[1][:, : frames * hw])
        k = apply_rotary(heads(attn.norm_k(attn.to_k(xy))), *rope)
        v = heads(attn.to_v(xy))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        want = attn.to_out[0](out.transpose(1, 2).flatten(2))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # what is kept for block b-1 is frame 1's attention input: its raw k, v once projected
        assert torch.equal(window.captured, x[:, hw : 2 * hw])
        assert window.captured.data_ptr() != x.data_ptr()


def test_block_layer_reads_and_writes_the_feature_cache(wan, stage_model):
    conditioner, layers = stage_model
    torch.manual_seed(4)
    cache = FeatureCache()
    temb, proj, text = conditioner.embed(torch.tensor([900.0]), torch.randn(1, 512, 32))
    hidden = torch.randn(1, 8, wan.inner_dim)  # 2 frames of 2x2 patches

    def run(block, **kw):
        state = WindowState(
            block=block, grid=(2, 2, 2), own_frames=1, guidance=None, temb=temb, timestep_proj=proj, text=text,
            rope=conditioner.rotary(3, 2, 2, "cpu"), cache=cache, hidden=hidden.clone(), **kw,
        )
        return layers[1](state).hidden

    with torch.no_grad():
        run(1, capture=(4, 8))  # block 1 leaves its second frame's k, v for block 0
        assert len(cache) == 1
        plain = run(0)
        assert len(cache) == 1
        with_cache = run(0, read_cache=True)
    assert len(cache) == 0
    assert not torch.allclose(plain, with_cache)


def test_the_estimate_counts_the_feature_cache_as_stored(wan, stage_model):
    conditioner, layers = stage_model
    cache = FeatureCache()
    temb, proj, text = conditioner.embed(torch.tensor([900.0]), torch.randn(1, 512, 32))
    state = WindowState(
        block=1, grid=(2, 2, 2), own_frames=1, guidance=None, temb=temb, timestep_proj=proj, text=text,
        rope=conditioner.rotary(2, 2, 2, "cpu"), cache=cache, hidden=torch.randn(1, 8, wan.inner_dim), capture=(4, 8),
    )
    with torch.no_grad():
        layers[1](state)
    stored = cache.pop(0, 1)
    per_layer = stored.numel() * stored.element_size()
    assert wan.num_layers * per_layer == feature_cache_bytes(wan, cached_tokens=4, batch=1, dtype_bytes=4)


def test_stage_reads_only_its_own_tensors(wan):
    total = len(SafetensorsFolder(TRANSFORMER).keys())
    counts = []
    for start, stop in ((0, 2), (2, 4), (4, 5)):  # embed+block0 | block1+block2 | head
        weights = FolderWeights(TRANSFORMER, torch.float32, "cpu")
        modules = [spec.build() for spec in layer_specs(wan, weights)[start:stop]]
        expected = sum(len(m.state_dict()) for m in modules)
        assert weights.safetensors.tensors_read == expected
        counts.append(expected)
    conditioner_weights = FolderWeights(TRANSFORMER, torch.float32, "cpu")
    Conditioner(wan, conditioner_weights)
    assert sum(counts) + conditioner_weights.safetensors.tensors_read == total
    assert max(counts) < total


def test_random_weights_do_not_depend_on_the_partition(wan):
    a = WanBlockLayer(wan, 2, RandomWeights(7, torch.float32, "cpu")).state_dict()
    b = WanBlockLayer(wan, 2, RandomWeights(7, torch.float32, "cpu")).state_dict()
    c = WanBlockLayer(wan, 1, RandomWeights(7, torch.float32, "cpu")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["attn1.to_q.weight"], c["attn1.to_q.weight"])


def test_bf16_keeps_diffusers_fp32_modules(wan):
    layer = WanBlockLayer(wan, 0, FolderWeights(TRANSFORMER, torch.bfloat16, "cpu"))
    assert layer.scale_shift_table.dtype == torch.float32
    assert layer.attn1.to_q.weight.dtype == torch.bfloat16
    assert layer.norm2.weight.dtype == torch.float32


def test_missing_shard_is_a_model_error(tmp_path):
    import shutil

    shutil.copytree(TRANSFORMER, tmp_path / "transformer")
    shard = sorted((tmp_path / "transformer").glob("*-00002-of-*.safetensors"))[0]
    shard.unlink()
    folder = SafetensorsFolder(tmp_path / "transformer")
    with pytest.raises(ModelError, match="missing"):
        folder.read(folder.keys())


def test_chunked_feed_forward_equals_the_whole(monkeypatch):
    from diffusers.models.attention import FeedForward

    from ds_dualparal.wan.model import ChunkedFeedForward

    torch.manual_seed(5)
    ff = ChunkedFeedForward(24, inner_dim=64, activation_fn="gelu-approximate")
    plain = FeedForward(24, inner_dim=64, activation_fn="gelu-approximate")
    assert list(ff.state_dict()) == list(plain.state_dict())  # checkpoint names unchanged
    x = torch.randn(2, 50, 24)
    whole = FeedForward.forward(ff, x)
    monkeypatch.setattr(ChunkedFeedForward, "chunk", 8)
    torch.testing.assert_close(ff(x), whole)


def run_block_layers(conditioner, wan, layers, seed, capture=None):
    """Each block layer (index 1) on the same window, 3 frames of 2x2 tokens reading 1 cached frame of the next
    block, CFG batch 2; per layer (its hidden output, the attention input it captured for block -1 or None)."""
    torch.manual_seed(seed)
    temb, proj, text = conditioner.embed(torch.tensor([900.0, 900.0]), torch.randn(2, 512, 32))
    hidden, cached = torch.randn(2, 12, wan.inner_dim), torch.randn(2, 4, wan.inner_dim)
    outputs = []
    for layer in layers:
        cache = FeatureCache()
        cache.put(1, 1, cached)
        state = WindowState(
            block=0, grid=(3, 2, 2), own_frames=2, guidance=None, temb=temb, timestep_proj=proj, text=text,
            rope=conditioner.rotary(4, 2, 2, "cpu"), cache=cache, read_cache=True, capture=capture,
            hidden=hidden.clone(),
        )
        with torch.no_grad():
            out = layer(state).hidden
        outputs.append((out, cache.pop(1, 0) if capture else None))
    return outputs


@pytest.mark.parametrize("attention_in_graph", [False, True])
def test_compiled_block_equals_the_plain_block(wan, stage_model, attention_in_graph):
    """Fused q/k/v and torch.compile (the CUDA default): same block output and cached input, within
    float32 rounding; the fused weights are views, not a second copy. With the attention as an opaque
    operator, the block is one compiled graph without a break (without it, the break splits the block and
    each frame it passes through: four graphs here)."""
    conditioner, _ = stage_model
    weights = FolderWeights(TRANSFORMER, torch.float32, "cpu")
    plain = WanBlockLayer(wan, 1, weights)
    compiled = WanBlockLayer(wan, 1, weights, compile=True, attention_in_graph=attention_in_graph)
    attn = compiled.attn1
    assert attn.to_k.weight.data_ptr() == attn.to_qkv.weight[wan.inner_dim:].data_ptr()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    (want, want_captured), (got, got_captured) = run_block_layers(conditioner, wan, (plain, compiled), 6, (4, 8))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_captured, want_captured, rtol=1e-5, atol=1e-5)
    counters = torch._dynamo.utils.counters
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 1 if attention_in_graph else graphs > 1, dict(counters["stats"])
    assert bool(counters["graph_break"]) is not attention_in_graph, dict(counters["graph_break"])


@pytest.mark.parametrize("attention_in_graph", [False, True])
def test_flash_4_runs_the_self_attention_through_flash_attn_cute(wan, stage_model, monkeypatch, attention_in_graph):
    """The flash_4 backend hands FlashAttention 4's `flash_attn_func` (batch, tokens, heads, head_dim) q, k, v
    (keys longer than queries: the cached frames) and takes its (out, lse); the cross-attention stays on
    diffusers' default. A stand-in module computes the same attention with PyTorch, so the block equals the
    default backend's (the real kernels run on the GPU machine only: BENCHMARKS.md)."""
    import sys
    import types

    calls = []

    def flash_attn_func(q, k, v):
        calls.append((q.shape, k.shape, v.shape))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2), torch.zeros(q.shape[:3])

    package, cute = types.ModuleType("flash_attn"), types.ModuleType("flash_attn.cute")
    cute.flash_attn_func = flash_attn_func
    package.cute = cute
    monkeypatch.setitem(sys.modules, "flash_attn", package)
    monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)
    conditioner, _ = stage_model
    weights = FolderWeights(TRANSFORMER, torch.float32, "cpu")
    default = WanBlockLayer(wan, 1, weights)
    flash = WanBlockLayer(wan, 1, weights, backend="flash_4", compile=attention_in_graph,
                          attention_in_graph=attention_in_graph)
    assert flash.attn2.processor._attention_backend is None
    torch._dynamo.reset()
    outputs = [hidden for hidden, _ in run_block_layers(conditioner, wan, (default, flash), 7)]
    heads, head_dim = wan.num_attention_heads, wan.attention_head_dim
    assert calls and all(c == ((2, 12, heads, head_dim), (2, 16, heads, head_dim), (2, 16, heads, head_dim))
                         for c in calls), calls
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
    flash.set_attention_backend(None)  # back to diffusers' default: the stand-in is no longer called
    calls.clear()
    run_block_layers(conditioner, wan, (flash,), 7)
    assert not calls


def test_the_private_names_the_model_relies_on_still_exist(wan):
    """No public API for these; an upgrade that renames them must fail here, not silently."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    # cross-attention's backend: diffusers' own set_attention_backend writes what set_attention_backend sets
    weights = FolderWeights(TRANSFORMER, torch.float32, "cpu")
    layer = WanBlockLayer(wan, 0, weights)
    assert layer.attn2.processor._attention_backend is None
    layer.attn2.set_attention_backend("_native_math")  # diffusers' public setter writes the attribute ours writes
    assert layer.attn2.processor._attention_backend == AttentionBackendName("_native_math")
    layer.set_attention_backend(None)
    assert layer.attn2.processor._attention_backend is None
    # the engine raises torch.compile's per-function recompile limit for its window shapes
    assert isinstance(torch._dynamo.config.recompile_limit, int)
