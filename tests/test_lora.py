"""LoRAs fused at load (ds_dualparal/wan/lora.py) against diffusers' load_lora_weights + fuse_lora.

Random LoRAs of the tiny model's shapes are written in both namings: diffusers/PEFT
(`transformer.blocks.N.attn1.to_q.lora_A.weight`) and the original Wan names community LoRAs use
(`diffusion_model.blocks.N.self_attn.q.lora_down.weight`, with `.alpha` and `.diff_b` biases).
"""

import json
import re

import pytest
import torch
from conftest import RANDOM_TINY, TINY_CONFIG, run_deepspeed, run_main
from diffusers import WanPipeline
from safetensors.torch import load_file, save_file

from ds_dualparal.cli.args import build_parser, config_from_args, parse_lora
from ds_dualparal.cli.jobs import parse_job
from ds_dualparal.config import ConfigError, DualParalConfig, LoraSpec, load_config
from ds_dualparal.output.checkpoint import fingerprint_fields
from ds_dualparal.pipeline.generation import reference_latents
from ds_dualparal.toy.tiny import write_tiny_wan
from ds_dualparal.wan.lora import (
    LoraError,
    LoraFile,
    check_loras,
    model_shapes,
    with_loras,
)
from ds_dualparal.wan.model import Conditioner, WanConfig, layer_specs
from ds_dualparal.wan.weights import FolderWeights

TINY_WAN_PATH = RANDOM_TINY  # the LoRA files here are made for its shapes
TINY_WAN = WanConfig.from_json(TINY_WAN_PATH / "transformer" / "config.json")
RANK = 4
_ATTENTION = {"attn1": "self_attn", "attn2": "cross_attn"}
_PROJECTIONS = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "o"}


def _targets(wan: WanConfig):
    """(diffusers module name, original Wan module name) of every linear layer a Wan LoRA trains."""
    for i in range(wan.num_layers):
        for attn, wan_attn in _ATTENTION.items():
            for proj, wan_proj in _PROJECTIONS.items():
                yield f"blocks.{i}.{attn}.{proj}", f"blocks.{i}.{wan_attn}.{wan_proj}"
        yield f"blocks.{i}.ffn.net.0.proj", f"blocks.{i}.ffn.0"
        yield f"blocks.{i}.ffn.net.2", f"blocks.{i}.ffn.2"


def write_lora(path, wan: WanConfig, naming: str, seed: int = 1, head: bool = False, alpha: float | None = None):
    """A random rank-4 LoRA on every block's linear layers (and the head's proj_out if `head`).

    `alpha` with the diffusers naming: a lora_alpha in diffusers' adapter metadata, as its
    `save_lora_weights` writes it (scaling alpha / rank).
    """
    generator = torch.Generator().manual_seed(seed)
    shapes = model_shapes(wan)
    targets = list(_targets(wan)) + ([("proj_out", "head.head")] if head else [])
    state = {}
    for name, wan_name in targets:
        out_features, in_features = shapes[name + ".weight"]
        down = torch.randn(RANK, in_features, generator=generator) * 0.3
        up = torch.randn(out_features, RANK, generator=generator) * 0.3
        if naming == "diffusers":
            state[f"transformer.{name}.lora_A.weight"] = down
            state[f"transformer.{name}.lora_B.weight"] = up
        else:
            state[f"diffusion_model.{wan_name}.lora_down.weight"] = down
            state[f"diffusion_model.{wan_name}.lora_up.weight"] = up
            state[f"diffusion_model.{wan_name}.diff_b"] = torch.randn(out_features, generator=generator) * 0.1
            if wan_name.startswith("blocks."):  # diffusers' converter reads alpha of block layers only
                state[f"diffusion_model.{wan_name}.alpha"] = torch.tensor(8.0)  # alpha / rank = 2
    metadata = None
    if alpha is not None:
        config = {"r": RANK, "lora_alpha": alpha, "target_modules": sorted({n for n, _ in targets}),
                  "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False, "use_rslora": False}
        metadata = {"lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()})}
    save_file(state, path, metadata=metadata)
    return path


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    return {
        "diffusers": write_lora(folder / "diffusers.safetensors", TINY_WAN, "diffusers"),
        "wan": write_lora(folder / "wan.safetensors", TINY_WAN, "wan", seed=2, head=True),
        "metadata": write_lora(folder / "metadata.safetensors", TINY_WAN, "diffusers", seed=3, alpha=2.0),
        "folder": folder,
    }


def our_state(sources, wan=TINY_WAN) -> dict[str, torch.Tensor]:
    """The whole transformer's tensors as our layers hold them after loading, by diffusers' names."""
    [source] = sources
    state = {}
    for spec in layer_specs(wan, source):
        layer = spec.build()
        prefix = f"blocks.{layer.index}." if hasattr(layer, "index") else ""
        state.update({prefix + k: v for k, v in layer.state_dict().items()})
    embedder = Conditioner(wan, source).condition_embedder.state_dict()
    state.update({"condition_embedder." + k: v for k, v in embedder.items()})
    return state


@pytest.mark.parametrize("naming, scale", [("diffusers", 0.7), ("wan", 1.0), ("metadata", 1.5)])
def test_fused_weights_are_diffusers_fuse_lora_bit_for_bit(loras, naming, scale):
    sources = with_loras([FolderWeights(TINY_WAN_PATH / "transformer", torch.float32, "cpu")], [TINY_WAN],
                         [LoraSpec(path=str(loras[naming]), scale=scale)])
    ours = our_state(sources)
    plain = our_state([FolderWeights(TINY_WAN_PATH / "transformer", torch.float32, "cpu")])
    pipe = WanPipeline.from_pretrained(TINY_WAN_PATH, dtype=torch.float32)
    pipe.load_lora_weights(loras[naming])
    pipe.fuse_lora(lora_scale=scale)
    pipe.unload_lora_weights()  # keeps the fused weights, drops PEFT's wrappers: plain names again
    theirs = pipe.transformer.state_dict()
    assert ours.keys() == theirs.keys()
    changed = [k for k in ours if not torch.equal(ours[k], plain[k])]
    assert [k for k in ours if not torch.equal(ours[k], theirs[k])] == []
    # every LoRA target changed (weights; the Wan naming's diff_b biases and head too), nothing else
    lora = LoraFile(loras[naming])
    expected = {t + ".weight" for t in lora.targets} | {t + ".bias" for t, v in lora.targets.items() if "bias" in v.parts}
    assert set(changed) == expected


def test_a_half_precision_weight_is_fused_in_fp32_and_rounded_once(loras):
    lora = LoraFile(loras["diffusers"])
    sources = with_loras([FolderWeights(TINY_WAN_PATH / "transformer", torch.bfloat16, "cpu")], [TINY_WAN],
                         [LoraSpec(path=str(loras["diffusers"]), scale=0.5)])
    ours = our_state(sources)
    plain = our_state([FolderWeights(TINY_WAN_PATH / "transformer", torch.bfloat16, "cpu")])
    for name, target in lora.targets.items():
        tensors = lora.read(target)
        want = (plain[name + ".weight"].float() + (tensors["up"] @ tensors["down"]) * 0.5).to(torch.bfloat16)
        assert ours[name + ".weight"].dtype == torch.bfloat16 and torch.equal(ours[name + ".weight"], want), name


def _one_block_config(**kw) -> DualParalConfig:
    base = dict(height=32, width=48, num_frames=13, num_inference_steps=4, guidance_scale=5.0, block_size=8,
                context=0, dtype="float32", seed=3, prompt="a cat walks", negative_prompt="blurry",
                model=str(TINY_WAN_PATH))
    return DualParalConfig(**{**base, **kw})


def _wan_pipeline(pipe, cfg: DualParalConfig, **kw):
    return pipe(
        prompt=cfg.prompt, negative_prompt=cfg.negative_prompt, height=cfg.height, width=cfg.width,
        num_frames=cfg.num_frames, num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
        generator=torch.Generator().manual_seed(cfg.seed), output_type="latent", **kw,
    ).frames


@pytest.mark.parametrize("naming, scale", [("diffusers", 0.7), ("wan", 1.0)])
def test_one_block_without_context_is_wan_pipeline_with_the_lora_fused(loras, naming, scale):
    """F = 4 latent frames in one block, c = 0: our reference is WanPipeline, LoRA included."""
    cfg = _one_block_config(loras=[{"path": str(loras[naming]), "scale": scale}])
    ours = reference_latents(cfg)
    pipe = WanPipeline.from_pretrained(TINY_WAN_PATH, dtype=torch.float32)
    pipe.load_lora_weights(loras[naming])
    pipe.fuse_lora(lora_scale=scale)
    want = _wan_pipeline(pipe, cfg)
    # the fused weights are bit-identical (above); the forward passes differ in fp32 rounding only,
    # as without a LoRA (test_reference.py): measured max |difference| 5e-6 (diffusers), 1.2e-5 (wan)
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=2e-5)
    without = reference_latents(cfg.with_overrides(loras=()))
    assert (ours - without).abs().max() > 0.1, "the LoRA changes the video"


def test_a_lora_names_the_expert_of_wan22(tmp_path, loras):
    path = write_tiny_wan(tmp_path / "a14b", two_experts=True)
    lora = loras["wan"]
    cfg = _one_block_config(model=str(path), guidance_scale_2=2.0, loras=[{"path": str(lora), "expert": "low_noise"}])
    pipe = WanPipeline.from_pretrained(path, dtype=torch.float32)
    pipe.load_lora_weights(lora, load_into_transformer_2=True)
    pipe.fuse_lora(components=["transformer_2"])
    want = _wan_pipeline(pipe, cfg, guidance_scale_2=2.0)
    ours = reference_latents(cfg)
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=2e-5)
    high = reference_latents(cfg.with_overrides(loras=({"path": str(lora), "expert": "high_noise"},)))
    assert not torch.allclose(ours, high)
    with pytest.raises(LoraError, match="this model has one transformer"):
        check_loras([LoraSpec(path=str(lora), expert="high_noise")], [TINY_WAN])


def _bad_loras(folder):
    """(file, what the one-line error must say) for each kind of LoRA that does not fit."""
    flux = folder / "flux.safetensors"  # keys of another architecture
    save_file({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 8),
               "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(8, 4)}, flux)
    unet = folder / "unet.safetensors"
    save_file({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8)}, unet)
    bigger = WanConfig(num_layers=3, num_attention_heads=2, attention_head_dim=24, text_dim=32, freq_dim=32, ffn_dim=128)
    other_size = write_lora(folder / "other_size.safetensors", bigger, "wan")
    deeper = write_lora(folder / "deeper.safetensors", WanConfig(**{**TINY_WAN.__dict__, "num_layers": 5}), "diffusers")
    pickle = folder / "pickle.safetensors"
    torch.save({"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 24)}, pickle)  # never loaded
    return [
        (flux, r"single_transformer_blocks\.0\.attn\.to_q names no layer of this model"),
        (unet, r"its keys name no layer of a Wan transformer"),
        (other_size, r"is 24x24 in this model but the LoRA gives 48x4 @ 4x48 \(made for another model size\?\)"),
        (deeper, r"blocks\.[34]\.\S+ names no layer of this model \(3 blocks"),
        (pickle, r"not a safetensors file"),
        (folder / "missing.safetensors", r"file not found"),
    ]


def test_loras_that_do_not_fit_are_one_line_errors_naming_the_file(tmp_path):
    for path, message in _bad_loras(tmp_path):
        with pytest.raises(LoraError) as err:
            check_loras([LoraSpec(path=str(path))], [TINY_WAN])
        text = str(err.value)
        assert text.startswith(f"lora {path}: ") and re.search(message, text) and "\n" not in text, text


def test_generate_refuses_a_bad_lora_with_exit_code_2(workdir):
    cases = {path.stem: message for path, message in _bad_loras(workdir)}
    for name in ("other_size", "pickle"):
        run = run_main("--config", TINY_CONFIG, "--model", TINY_WAN_PATH, "--lora", f"{name}.safetensors:0.5", "--output", "v.mp4", cwd=workdir)
        assert run.returncode == 2, run.explain()
        [line] = run.stderr.strip().splitlines()[-1:]
        assert line.startswith(f"generate.py: error: lora {name}.safetensors: ") and re.search(cases[name], line), run.explain()
        assert not (workdir / "v.mp4").exists()


def test_lora_flag_and_config_field(tmp_path):
    assert parse_lora("a.safetensors") == {"path": "a.safetensors"}
    assert parse_lora("a.safetensors:0.5") == {"path": "a.safetensors", "scale": 0.5}
    assert parse_lora("a.safetensors:0.5:low_noise") == {"path": "a.safetensors", "scale": 0.5, "expert": "low_noise"}
    assert parse_lora("a.safetensors:high_noise") == {"path": "a.safetensors", "expert": "high_noise"}
    assert parse_lora("dir:with:colons.safetensors") == {"path": "dir:with:colons.safetensors"}
    args = build_parser().parse_args(["--config", str(TINY_CONFIG), "--lora", "a.safetensors", "--lora", "b.safetensors:-1"])
    assert config_from_args(args).loras == (LoraSpec(path="a.safetensors"), LoraSpec(path="b.safetensors", scale=-1.0))
    raw = json.loads(TINY_CONFIG.read_text())
    raw["dualparal"]["loras"] = [{"path": "c.safetensors", "expert": "both"}]
    (tmp_path / "c.json").write_text(json.dumps(raw))
    assert config_from_args(build_parser().parse_args(["--config", str(tmp_path / "c.json")])).loras == (
        LoraSpec(path="c.safetensors"),)
    flags = build_parser().parse_args(["--config", str(tmp_path / "c.json"), "--lora", "a.safetensors"])
    assert config_from_args(flags).loras == (LoraSpec(path="a.safetensors"),), "the flags replace the config's list"
    with pytest.raises(ConfigError, match=r"^dualparal.loras\[0\].scale: inf must be a finite number$"):
        config_from_args(build_parser().parse_args(["--lora", "a.safetensors:inf"]))
    with pytest.raises(ConfigError, match=r"^dualparal.loras\[1\].expert: \"mid\" is not allowed"):
        load_config(None, {"loras": [{"path": "a"}, {"path": "b", "expert": "mid"}]})
    with pytest.raises(ConfigError, match=r"^dualparal.loras: \"a\" must be an array"):
        load_config(None, {"loras": "a"})
    # model-level: a jobs line cannot change it; it changes the latents: resume fingerprints it
    cfg = load_config(TINY_CONFIG, {"loras": [{"path": "a.safetensors"}]}).dualparal
    from pathlib import Path

    job = parse_job(1, json.dumps({"loras": []}), cfg, Path("/out"))
    assert job.error == "loras: is a setting of the whole run and cannot change per job"
    plain = fingerprint_fields(cfg.with_overrides(loras=()), TINY_WAN_PATH)
    assert plain["loras"] == []
    assert fingerprint_fields(cfg, TINY_WAN_PATH)["loras"] == [{"path": "a.safetensors", "scale": 1.0, "expert": "both"}]


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_few_step_euler_without_cfg_and_a_lora_is_bit_identical_on_1_to_4_stages(tmp_path, loras, ranks):
    """`--scheduler euler --guidance 1 --steps 4`, the few-step LoRA setting; the tiny config's K = 2 blocks."""
    flags = ["--scheduler", "euler", "--guidance", "1", "--steps", "4", "--lora", f"{loras['wan']}:0.8",
             "--lora", str(loras["diffusers"])]
    run = run_deepspeed(ranks, "--config", TINY_CONFIG, "--model", TINY_WAN_PATH, *flags, "--output", "v.mp4", "--save-latents", "l.safetensors",
                        cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.explain()
    cfg = config_from_args(build_parser().parse_args(["--config", str(TINY_CONFIG), "--model", str(TINY_WAN_PATH), *flags]))
    assert not cfg.do_classifier_free_guidance and len(cfg.loras) == 2
    assert torch.equal(load_file(tmp_path / "l.safetensors")["latents"], reference_latents(cfg))
    # each rank reads only its own layers' LoRA tensors (the wan LoRA's head: the last stage)
    read = [int(n) for n in re.findall(r"\((\d+) LoRA tensors read\)", run.stdout + run.stderr)]
    total = sum(LoraFile(path).tensors for path in (loras["wan"], loras["diffusers"]))
    assert len(read) == ranks and sum(read) == total, read
