"""The sequential reference against diffusers' WanPipeline, and the initial noise."""

import pytest
import torch
from conftest import RANDOM_TINY
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

from ds_dualparal.config import DualParalConfig
from ds_dualparal.pipeline.denoise import WindowBuilder, make_scheduler, run_reference
from ds_dualparal.pipeline.generation import build_plan
from ds_dualparal.pipeline.noise import initial_noise
from ds_dualparal.pipeline.timeline import BlockTimeline
from ds_dualparal.toy.tiny import write_tiny_wan
from ds_dualparal.wan.model import Conditioner, WanConfig, layer_specs
from ds_dualparal.wan.weights import FolderWeights, ModelFolder

# The fp32 agreement with WanPipeline below (1e-5) was measured on the random tiny model; the trained
# embedded one has larger activations and agrees to 1.4e-5 (same operations, another rounding).
TINY_WAN_PATH = RANDOM_TINY


def load_experts(folder: ModelFolder):
    experts = []
    for path in folder.experts:
        wan = WanConfig.from_json(path / "config.json")
        weights = FolderWeights(path, torch.float32, "cpu")
        experts.append((Conditioner(wan, weights), [spec.build() for spec in layer_specs(wan, weights)]))
    return wan, experts


def reference(folder_path, cfg: DualParalConfig, text, noise=None):
    folder = ModelFolder(folder_path)
    wan, experts = load_experts(folder)
    scheduler = make_scheduler(cfg.scheduler, cfg.flow_shift, cfg.num_inference_steps, folder.path / "scheduler")
    plan = build_plan(cfg, wan, scheduler, folder.boundary_ratio, len(experts))
    if noise is None:
        noise = initial_noise(plan.timeline, cfg.seed, (16, plan.latent_height, plan.latent_width), cfg.noise)
    return run_reference(plan, experts, text[None], noise, scheduler)  # one text for every block


def config(**kw):
    base = dict(height=32, width=48, num_frames=13, num_inference_steps=4, guidance_scale=5.0,
                block_size=4, context=0, dtype="float32", seed=3)
    return DualParalConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def texts():
    torch.manual_seed(0)
    return torch.randn(1, 512, 32), torch.randn(1, 512, 32)


def diffusers_latents(pipe, cfg, texts, latents):
    return pipe(
        prompt_embeds=texts[0], negative_prompt_embeds=texts[1], latents=latents.clone(),
        height=cfg.height, width=cfg.width, num_frames=cfg.num_frames,
        num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale, output_type="latent",
    ).frames


@pytest.mark.parametrize("scheduler", ["unipc", "euler"])
def test_one_block_without_context_is_wan_pipeline(texts, scheduler):
    cfg = config(block_size=8, scheduler=scheduler)  # F = 4 latents: one block holds the video
    assert BlockTimeline(cfg.latent_frames, 8, 0, 4).num_blocks == 1
    pipe = WanPipeline.from_pretrained(TINY_WAN_PATH, dtype=torch.float32)
    if scheduler == "euler":
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=cfg.flow_shift, num_train_timesteps=1000)
    generator = torch.Generator().manual_seed(cfg.seed)
    latents = pipe.prepare_latents(1, 16, cfg.height, cfg.width, cfg.num_frames, torch.float32, "cpu", generator)
    ours = reference(TINY_WAN_PATH, cfg, torch.cat(texts))
    noise = initial_noise(BlockTimeline(cfg.latent_frames, 8, 0, 4), cfg.seed, (16, 4, 6))
    assert torch.equal(noise[0], latents), "the same seed gives diffusers' initial latents"
    torch.testing.assert_close(ours, diffusers_latents(pipe, cfg, texts, latents), rtol=1e-5, atol=1e-5)


def test_two_experts_switch_at_the_boundary_like_wan22(tmp_path, texts):
    path = write_tiny_wan(tmp_path / "a14b", two_experts=True)
    cfg = config(block_size=8, guidance_scale=5.0, guidance_scale_2=2.0)
    pipe = WanPipeline.from_pretrained(path, dtype=torch.float32)
    latents = initial_noise(BlockTimeline(cfg.latent_frames, 8, 0, 4), cfg.seed, (16, 4, 6))[0]
    want = pipe(
        prompt_embeds=texts[0], negative_prompt_embeds=texts[1], latents=latents.clone(), height=32, width=48,
        num_frames=13, num_inference_steps=4, guidance_scale=5.0, guidance_scale_2=2.0, output_type="latent",
    ).frames
    ours = reference(path, cfg, torch.cat(texts))
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)
    single = reference(TINY_WAN_PATH, cfg, torch.cat(texts))
    assert not torch.allclose(ours, single)


def test_blocks_without_context_are_independent_wan_runs(texts):
    """c = 0: no context and no cache, so each block is plain Wan on its own frames and noise."""
    cfg = config(num_frames=25, block_size=2)  # 7 latents -> blocks of 3, 2, 2
    timeline = BlockTimeline(cfg.latent_frames, 2, 0, cfg.num_inference_steps)
    noise = initial_noise(timeline, cfg.seed, (16, 4, 6))
    assert [n.shape[2] for n in noise] == [3, 2, 2]
    ours = reference(TINY_WAN_PATH, cfg, torch.cat(texts), noise)
    pipe = WanPipeline.from_pretrained(TINY_WAN_PATH, dtype=torch.float32)
    for b, block_noise in enumerate(noise):
        frames = 4 * (block_noise.shape[2] - 1) + 1
        want = diffusers_latents(pipe, config(num_frames=frames), texts, block_noise)
        start, stop = timeline.block_range(b)
        torch.testing.assert_close(ours[:, :, start:stop], want, rtol=1e-5, atol=1e-5)


def test_context_and_cache_couple_neighbouring_blocks(texts):
    cfg = config(num_frames=25, block_size=2, context=1)  # 7 latents -> K = 3, block 0 = 3 frames
    timeline = BlockTimeline(cfg.latent_frames, 2, 1, cfg.num_inference_steps)
    noise = initial_noise(timeline, cfg.seed, (16, 4, 6))
    base = reference(TINY_WAN_PATH, cfg, torch.cat(texts), noise)
    changed = [n.clone() for n in noise]
    changed[2] = changed[2] + 1.0  # the last block's noise: reaches block 1 through the cache
    other = reference(TINY_WAN_PATH, cfg, torch.cat(texts), changed)
    start, stop = timeline.block_range(1)
    assert not torch.allclose(base[:, :, start:stop], other[:, :, start:stop])
    independent = reference(TINY_WAN_PATH, config(num_frames=25, block_size=2), torch.cat(texts), noise)
    assert not torch.allclose(base, independent)


def test_coordinated_noise_is_deterministic_and_shares_the_pool():
    timeline = BlockTimeline(20, 4, 2, 3)  # K = 4, block 0 takes 8 frames
    a = initial_noise(timeline, 11, (16, 2, 3))
    b = initial_noise(timeline, 11, (16, 2, 3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert [x.shape[2] for x in a] == [timeline.block_len(i) for i in range(4)]
    pool = {tuple(a[0][0, :, f].flatten().tolist()) for f in range(a[0].shape[2])}
    for block in a[1:]:
        frames = [tuple(block[0, :, f].flatten().tolist()) for f in range(block.shape[2])]
        assert all(f in pool for f in frames) and len(set(frames)) == len(frames)
    assert not torch.equal(a[1], a[2]), "each block permutes the pool its own way"
    c = initial_noise(timeline, 12, (16, 2, 3))
    assert not torch.equal(a[0], c[0])


def test_independent_noise_is_fresh_per_block_and_deterministic():
    timeline = BlockTimeline(20, 4, 2, 3)
    a = initial_noise(timeline, 11, (16, 2, 3), "independent")
    b = initial_noise(timeline, 11, (16, 2, 3), "independent")
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    coordinated = initial_noise(timeline, 11, (16, 2, 3))
    assert torch.equal(a[0], coordinated[0])
    pool = {tuple(a[0][0, :, f].flatten().tolist()) for f in range(a[0].shape[2])}
    assert all(tuple(a[1][0, :, f].flatten().tolist()) not in pool for f in range(4))
    with pytest.raises(ValueError, match="noise mode"):
        initial_noise(timeline, 11, (16, 2, 3), "shared")


def test_prompt_embeddings_are_wan_pipelines_and_the_encoder_loads_once(monkeypatch):
    from transformers import UMT5EncoderModel

    from ds_dualparal.wan.text import encode_prompts

    loads = []
    original = UMT5EncoderModel.from_pretrained.__func__
    monkeypatch.setattr(UMT5EncoderModel, "from_pretrained", classmethod(lambda cls, *a, **k: loads.append(a) or original(cls, *a, **k)))
    with_cfg, without = encode_prompts(TINY_WAN_PATH, [("a cat runs", "blurry", True), ("a dog", "", False)], "cpu", torch.float32)
    assert len(loads) == 1
    pipe = WanPipeline.from_pretrained(TINY_WAN_PATH, dtype=torch.float32)
    with torch.no_grad():  # as WanPipeline.__call__ runs it
        cond, uncond = pipe.encode_prompt("a cat runs", "blurry", True, max_sequence_length=512, device="cpu")
        plain = pipe.encode_prompt("a dog", None, False, max_sequence_length=512, device="cpu")[0]
    assert torch.equal(with_cfg, torch.cat([cond, uncond])) and with_cfg.shape == (2, 512, 32)
    assert torch.equal(without, plain)


def test_each_condition_embedding_is_computed_once_per_what_it_depends_on(tmp_path, monkeypatch):
    """The time embedding once per step, the text projection once per (expert, text mix), instead of both
    per block-step: the same latents as the per-block-step `Conditioner.embed`, and nothing kept after."""
    path = write_tiny_wan(tmp_path / "a14b", two_experts=True)
    cfg = config(num_frames=37, block_size=2, context=1, prompt_transition=1, prompts=[  # 4 blocks, 2 experts
        {"from_frame": 0, "prompt": "a"}, {"from_frame": 21, "prompt": "b"}])
    folder = ModelFolder(path)
    wan, experts = load_experts(folder)
    scheduler = make_scheduler(cfg.scheduler, cfg.flow_shift, cfg.num_inference_steps, folder.path / "scheduler")
    plan = build_plan(cfg, wan, scheduler, folder.boundary_ratio, len(experts))
    noise = initial_noise(plan.timeline, cfg.seed, (16, plan.latent_height, plan.latent_width), cfg.noise)
    texts = torch.randn(plan.num_texts, 2, 512, 32, generator=torch.Generator().manual_seed(0))
    steps = list(plan.timeline.block_steps())
    assert len({plan.text_mix(b) for b in range(4)}) == 3 and {plan.expert(s) for s in range(4)} == {0, 1}

    def per_block_step(self, step):  # what every block-step computed before
        t = self.timesteps[step.step].expand(plan.batch)
        return self.conditioners[plan.expert(step.step)].embed(t, self.text(step.block), self.image)

    with monkeypatch.context() as patch:
        patch.setattr(WindowBuilder, "embeddings", per_block_step)
        want = run_reference(plan, experts, texts, noise, scheduler)
    calls = {"embed_time": 0, "embed_text": 0}
    for name in calls:
        monkeypatch.setattr(Conditioner, name, counted(getattr(Conditioner, name), calls, name))
    builders = []
    monkeypatch.setattr(WindowBuilder, "embeddings", counted(WindowBuilder.embeddings, builders))
    got = run_reference(plan, experts, texts, noise, scheduler)
    assert torch.equal(got, want)
    assert calls == {"embed_time": cfg.num_inference_steps,
                     "embed_text": len({(plan.expert(s.step), plan.text_mix(s.block)) for s in steps})}
    assert calls["embed_text"] < len(steps) and len(builders) == len(steps)
    assert builders[-1]._embeddings == {}  # each dropped after its last use


def counted(method, calls, name=None):
    """`method`, counting its calls in `calls[name]`, or appending its `self` to the list `calls`."""
    def wrapper(self, *args, **kwargs):
        if name is None:
            calls.append(self)
        else:
            calls[name] += 1
        return method(self, *args, **kwargs)
    return wrapper
