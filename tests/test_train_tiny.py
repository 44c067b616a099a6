"""launch/train_tiny.py on the CPU: a smoke run writes a model folder that diffusers and generate.py load."""

import json

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY_CONFIG, launch_script, run_forked, run_generate
from diffusers import WanPipeline
from safetensors.torch import load_file

from ds_dualparal.toy import toyvideo
from ds_dualparal.toy.tiny import build_text_encoder

TRAIN = ROOT / "launch" / "train_tiny.py"


def train(tmp_path, *flags, code=0):
    """`python launch/train_tiny.py FLAGS` in `tmp_path` (forked from the session's forkserver)."""
    result = run_forked(TRAIN, 1, ["--device", "cpu", *flags], tmp_path, timeout=180)
    assert result.returncode == code, result.stderr[-3000:]
    return result


def weights(folder):
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def test_smoke_training_writes_a_model_that_generates(tmp_path):
    out = tmp_path / "model"
    result = train(tmp_path, "--out", out, "--smoke", "--dit-steps", 4)
    assert "dit step 4/4" in result.stderr and "vae step 2/2" in result.stderr

    log = json.loads((out / "training_log.json").read_text())
    assert log["vae"]["steps"] == 2 and log["dit"]["steps"] == 4
    assert log["vae"]["stopped_by"] == log["dit"]["stopped_by"] == "steps"
    assert all(isinstance(log[s]["final_loss"], float) for s in ("vae", "dit"))
    assert log["config"]["dit_steps"] == 4 and log["config"]["seed"] == 0
    assert 0 < log["total_safetensors_bytes"] <= 20e6

    pipe = WanPipeline.from_pretrained(out)
    # the latent statistics measured on the clip pool went into the VAE config
    assert pipe.vae.config.latents_mean == log["latents"]["mean"]
    assert pipe.vae.config.latents_std == log["latents"]["std"]
    assert all(s > 0 for s in pipe.vae.config.latents_std)
    # the text encoder trained with the DiT, from tiny.py's (write_tiny_wan(seed=0)'s) random one, and it still
    # encodes prompts as WanPipeline does
    start = build_text_encoder(3).state_dict()
    trained_text = pipe.text_encoder.state_dict()
    assert trained_text.keys() == start.keys()
    assert not torch.equal(trained_text["shared.weight"], start["shared.weight"])
    assert log["text_embedding_error_vs_wanpipeline"] < 1e-4 and log["dit"]["extra"]["text_encoder_trained"]
    for words in toyvideo.all_prompts()[:: 37]:
        assert pipe.tokenizer.unk_token_id not in pipe.tokenizer(words).input_ids
    assert pipe.transformer.config.text_dim == pipe.text_encoder.config.d_model
    assert pipe.scheduler.config.prediction_type == "flow_prediction" and pipe.scheduler.config.flow_shift == 3.0
    video = pipe(prompt=toyvideo.all_prompts()[5], num_frames=5, height=32, width=32, num_inference_steps=2,
                 guidance_scale=5.0, output_type="np", generator=torch.Generator().manual_seed(0)).frames
    assert video.shape == (1, 5, 32, 32, 3) and np.isfinite(video).all()
    index = json.loads((out / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 2
    # the saved weights are the trained (EMA) ones, not the initialisation
    trained = {}
    for shard in shards:
        trained.update(load_file(out / "transformer" / shard))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(40)  # train_dit's initialisation for --seed 0
        fresh = type(pipe.transformer)(**{k: v for k, v in pipe.transformer.config.items() if not k.startswith("_")})
    assert not torch.equal(fresh.state_dict()["proj_out.weight"], trained["proj_out.weight"])

    run = run_generate("--config", TINY_CONFIG, "--model", out, "--prompt", toyvideo.all_prompts()[0],
                       "--output", "toy.mp4", "--save-latents", "toy.safetensors", cwd=tmp_path)
    assert run.returncode == 0, run.explain()
    latents = load_file(tmp_path / "toy.safetensors")["latents"]
    assert latents.shape == (1, 16, 6, 8, 8) and torch.isfinite(latents).all()
    assert (tmp_path / "toy.mp4").stat().st_size > 0
    # --vae-temporal local (the default): the saved VAE's convolutions outside the temporal resampling see
    # the current frame only, and the log says how well the VAE keeps the object over a long clip
    assert log["vae"]["extra"]["temporal"] == "local"
    local = train_tiny.looking_back(pipe.vae)
    assert len(local) > 10 and all(not conv.weight[:, :, :-1].any() for conv in local)
    assert all(conv.weight[:, :, -1].any() for conv in local)
    assert 0.0 <= log["vae"]["extra"]["held_out_adherence_long_second_half"] <= 1.0


train_tiny = launch_script("train_tiny.py")


def test_keeping_a_vae_local_in_time_keeps_its_response_to_a_still_picture():
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(**train_tiny.vae_config(train_tiny.parse_args(["--out", "/nonexistent/x", "--smoke"])))
    convs = train_tiny.looking_back(vae)
    names = {name for name, m in vae.named_modules() if any(m is c for c in convs)}
    assert names and not any(name.endswith("time_conv") for name in names)  # the resampling keeps its taps
    assert any(".resnets." in name for name in names) and any("conv_in" in name for name in names)
    conv = convs[3]
    still = torch.rand(1, conv.in_channels, 1, 8, 8).repeat(1, 1, 6, 1, 1)
    moving = torch.rand(1, conv.in_channels, 6, 8, 8)
    clip = torch.rand(1, 3, 9, 16, 16) * 2 - 1
    with torch.no_grad():
        before_still, before_moving = conv(still), conv(moving)
        train_tiny.keep_local_in_time(convs)
        after_still, after_moving = conv(still), conv(moving)
        encoded = train_tiny.encode_moments(vae, clip)
        train_tiny.keep_local_in_time(convs)  # idempotent
        again = train_tiny.encode_moments(vae, clip)
    assert all(not c.weight[:, :, :-1].any() for c in convs) and all(c.weight[:, :, -1].any() for c in convs)
    # past its causal padding (two frames), a still picture gives what it gave before; a moving one does not
    torch.testing.assert_close(after_still[:, :, 2:], before_still[:, :, 2:], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(after_moving[:, :, 2:], before_moving[:, :, 2:], atol=1e-3)
    # each frame is now its own: the conv of one frame alone equals its slice of the whole clip's
    torch.testing.assert_close(conv(moving[:, :, 4:5]), after_moving[:, :, 4:5], atol=1e-5, rtol=1e-5)
    assert torch.equal(again, encoded)


def test_bad_arguments_end_in_one_line(tmp_path):
    for flags, words in ((["--vae-frames", "12"], "4k+1"), (["--min-crop", "9", "--max-crop", "4"], "--min-crop"),
                         (["--dit-head-dim", "15"], "rotary"), (["--whole-clip-prob", "2"], "--whole-clip-prob"),
                         (["--first-frame-prob", "-0.1"], "--first-frame-prob"),
                         (["--resume", str(tmp_path)], "state.json")):
        result = train(tmp_path, "--out", tmp_path / "x", "--smoke", *flags, code=2)
        assert words in result.stderr, result.stderr
        assert not (tmp_path / "x").exists()
    kept = tmp_path / "mine"  # a folder with the user's files is never written into
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    result = train(tmp_path, "--out", kept, "--smoke", code=2)
    assert "not an empty folder" in result.stderr, result.stderr
    assert [p.name for p in kept.iterdir()] == ["notes.txt"]


def test_a_paused_and_resumed_run_equals_the_uninterrupted_one(tmp_path):
    """--pause-at-step saves the state; --resume goes on from it (the pool rebuilt as it stood, the
    generators, AdamW's moments and the EMA restored) and ends with the same weights, bit for bit."""
    smoke = ["--smoke", "--dit-steps", 5, "--pool-refresh-every", 2]
    train(tmp_path, "--out", tmp_path / "whole", *smoke)
    paused = train(tmp_path, "--out", tmp_path / "first", "--state", tmp_path / "saved", "--pause-at-step", 3, *smoke)
    assert "paused: --resume" in paused.stderr
    assert json.loads((tmp_path / "first" / "training_log.json").read_text())["dit"]["stopped_by"] == "paused"
    resumed = train(tmp_path, "--resume", tmp_path / "saved", "--out", tmp_path / "second",
                    "--state", tmp_path / "saved-2")
    assert "resumed at DiT step 3 of 5" in resumed.stderr and "dit step 5/5" in resumed.stderr
    log = json.loads((tmp_path / "second" / "training_log.json").read_text())
    assert log["dit"]["steps"] == 5 and log["dit"]["stopped_by"] == "steps"
    assert [p["from_step"] for p in log["dit"]["extra"]["processes"]] == [0, 3]
    for part in ("transformer", "text_encoder", "vae"):
        whole, second = weights(tmp_path / "whole" / part), weights(tmp_path / "second" / part)
        first = weights(tmp_path / "first" / part)
        assert whole.keys() == second.keys()
        assert all(torch.equal(whole[k], second[k]) for k in whole), part
        if part != "vae":  # the paused model is the one of step 3, not the final one
            assert not all(torch.equal(whole[k], first[k]) for k in whole), part


def test_a_model_folder_that_cannot_be_written_leaves_nothing(tmp_path):
    import errno

    train_tiny = launch_script("train_tiny.py")

    def disk_full(partial):
        (partial / "transformer").mkdir(parents=True)
        (partial / "transformer" / "half.safetensors").write_bytes(b"\0" * 64)
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "model"
    out.mkdir()  # the empty folder the arguments were checked against
    problem = train_tiny.publish_folder(out, disk_full)
    assert "--out" in problem and "No space left on device" in problem and "\n" not in problem
    assert list(tmp_path.iterdir()) == [out] and not any(out.iterdir())  # no temporary left, nothing at --out

    def whole(partial):
        partial.mkdir()
        (partial / "training_log.json").write_text("{}")

    assert train_tiny.publish_folder(out, whole) is None
    assert [p.name for p in out.iterdir()] == ["training_log.json"] and list(tmp_path.iterdir()) == [out]


def test_first_frame_crops():
    """--first-frame-prob: that share of the crops starts at the clip's first latent frame (at 0, the
    default, as uniformly as before)."""
    from types import SimpleNamespace

    frames, length, batch = 41, 4, 64
    # every latent frame holds its own index, so a crop's first frame says where it starts
    latents = torch.arange(frames, dtype=torch.float32).view(1, frames, 1, 1, 1).expand(8, frames, 16, 2, 2)
    pool = SimpleNamespace(latents=latents.contiguous(), prompts=torch.zeros(8, dtype=torch.long))

    def starts(prob, seed=0):
        args = train_tiny.parse_args(["--out", "/nonexistent/x", "--smoke", "--first-frame-prob", str(prob)])
        generator = torch.Generator().manual_seed(seed)
        x_t, timestep, _, target = train_tiny.dit_batch(pool, 1, length, batch, args, generator, dropout=False,
                                                        context_jitter=False)
        sigma = (timestep / 1000.0).view(batch, 1, 1, 1, 1)
        x0 = x_t - sigma * target  # x_t = x0 + sigma (noise - x0)
        return x0[:, 0, 0, 0, 0].round().long()

    assert (starts(1.0) == 0).all()
    assert (starts(0.0) > 0).float().mean() > 0.8
    half = starts(0.5)
    assert 0.25 < (half == 0).float().mean() < 0.75


def test_a_grown_dit_starts_as_the_trained_one():
    """--dit-init with k times fewer layers: the deeper DiT computes what the trained one did (its extra
    blocks start as identities) and every extra block can learn (its branch outputs get gradients)."""
    from diffusers import WanTransformer3DModel

    config = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                  text_dim=8, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64)
    torch.manual_seed(0)
    small = WanTransformer3DModel(**config).eval()
    for p in small.parameters():  # diffusers zero-inits some projections; make every branch matter
        p.data.normal_(0.0, 0.2)
    deep = WanTransformer3DModel(**{**config, "num_layers": 6}).eval()
    deep.load_state_dict(train_tiny.grown_state_dict(small.state_dict(), 2, 6))
    x = torch.randn(1, 4, 3, 4, 4)
    text = torch.randn(1, 5, 8)
    t = torch.tensor([500.0])
    with torch.no_grad():
        want = small(x, t, text, return_dict=False)[0]
        got = deep(x, t, text, return_dict=False)[0]
    assert want.abs().mean() > 0.01
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # the copies are the trained block with zeroed outputs, not noise, and they do receive gradients
    torch.testing.assert_close(deep.blocks[4].attn1.to_q.weight, small.blocks[1].attn1.to_q.weight)
    assert not deep.blocks[4].ffn.net[2].weight.any()
    deep.train()
    deep(x, t, text, return_dict=False)[0].square().mean().backward()
    assert deep.blocks[4].ffn.net[2].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="multiple"):
        train_tiny.grown_state_dict(small.state_dict(), 2, 5)


def test_a_dit_init_of_another_depth_must_divide_the_new_one(tmp_path):
    result = train(tmp_path, "--out", tmp_path / "x", "--smoke", "--dit-init", ROOT / "ds_dualparal" / "assets" /
                   "tiny-wan", "--dit-layers", "6", code=2)
    assert "--dit-layers 6 must be a multiple" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()
    result = train(tmp_path, "--out", tmp_path / "y", "--smoke", "--dit-init", ROOT / "ds_dualparal" / "assets" /
                   "tiny-wan", "--dit-layers", "8", "--dit-ffn", "64", code=2)
    assert "--dit-ffn 64 differs from the --dit-init model's ffn_dim 512" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "y").exists()
