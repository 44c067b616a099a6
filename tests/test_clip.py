"""Continuing a clip (`--continue-from`, docs/continue-a-clip.md): the timeline after a prefix, the clip
kept bit for bit as the first latent frames, new frames that depend on it, the same latents on 1, 2
and 3 stages, the mp4 that starts with the clip's frames, checkpoints, batch jobs and bad clips."""

import json
import shutil

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from conftest import TINY_CONFIG, run_deepspeed, run_generate
from diffusers import AutoencoderKLWan
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from ds_dualparal.config import load_config
from ds_dualparal.output.checkpoint import fingerprint_fields
from ds_dualparal.output.video import StreamingDecoder, to_uint8_frames
from ds_dualparal.pipeline.clip import (
    _read_video,
    clip_problem,
    encode_video,
    job_timeline,
    latents_metadata,
)
from ds_dualparal.pipeline.generation import reference_latents
from ds_dualparal.pipeline.planner import Costs, simulate
from ds_dualparal.pipeline.schedule import DualParalSchedule, SaveCheckpoint
from ds_dualparal.pipeline.timeline import BlockTimeline
from ds_dualparal.wan.weights import TINY_WAN_PATH

CLIP_FRAMES, CLIP_LATENT = 21, 6  # tiny.json's video: the clip the tests continue
FRAMES, LATENT = 41, 11

# ---- the timeline after a prefix (pure)


def test_example_timeline_after_a_clip():
    tl = BlockTimeline(num_frames=11, block_size=2, context=1, num_steps=4, prefix=6)
    assert tl.num_blocks == 2
    assert [tl.block_range(b) for b in range(2)] == [(6, 9), (9, 11)]
    assert [tl.window_range(b) for b in range(2)] == [(5, 9), (8, 11)]  # block 0 reads the clip's last frame
    assert tl.num_iterations == 5


@given(st.integers(1, 10), st.integers(0, 10), st.integers(1, 60), st.integers(1, 60), st.integers(1, 4))
def test_blocks_tile_the_frames_after_the_prefix_with_windows_as_without_one(block_size, context, frames, prefix, steps):
    context = min(context, block_size)
    frames = prefix + frames
    tl = BlockTimeline(frames, block_size, context, steps, prefix=prefix)
    ranges = [tl.block_range(b) for b in range(tl.num_blocks)]
    assert ranges[0][0] == prefix and ranges[-1][1] == frames
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert tl.context_len(0) == min(context, prefix)
    assert tl.window_range(0) == (prefix - min(context, prefix), ranges[0][1])
    assert all(tl.block_len(b) == block_size for b in range(1, tl.num_blocks))
    if tl.num_blocks > 1:  # block 0's window is cut as without a clip: B + c up to 2B + c - 1 frames
        window = ranges[0][1] - tl.window_range(0)[0]
        assert block_size + context <= window < 2 * block_size + context
        assert tl.block_len(0) >= context  # block 1's context lies in block 0, not in the clip
    assert tl.block_len(0) >= 1


def test_no_prefix_is_the_plain_timeline():
    for frames, block, context in [(13, 4, 2), (48, 8, 8), (5, 4, 2)]:
        plain, zero = BlockTimeline(frames, block, context, 3), BlockTimeline(frames, block, context, 3, prefix=0)
        assert [plain.window_range(b) for b in range(plain.num_blocks)] == [
            zero.window_range(b) for b in range(zero.num_blocks)]


@pytest.mark.parametrize("prefix", [11, 12, -1])
def test_a_prefix_must_leave_frames_to_generate(prefix):
    with pytest.raises(ValueError, match="prefix must be an integer in"):
        BlockTimeline(11, 2, 1, 4, prefix=prefix)


@pytest.mark.parametrize("stages", [1, 2, 3])
@pytest.mark.parametrize("overlap", [False, True])
def test_the_schedule_of_a_continued_timeline_pairs_every_message(stages, overlap):
    tl = BlockTimeline(num_frames=17, block_size=2, context=2, num_steps=3, prefix=6)
    simulate(tl, stages, Costs([1.0] * stages), overlap=overlap)  # raises on a deadlock or a message without its pair


# ---- the oracle: the clip is kept, the new frames depend on it


@pytest.fixture(scope="module")
def clip(tiny_single_run):
    """tiny.json's own video (21 frames) as latents and as mp4, in a folder of their own."""
    cwd, _ = tiny_single_run
    return cwd


def continued(cfg_overrides, clip_path):
    return load_config(TINY_CONFIG, dict(num_frames=FRAMES, continue_from=str(clip_path), **cfg_overrides)).dualparal


@pytest.fixture(scope="module")
def continued_reference(clip):
    return reference_latents(continued({}, clip / "tiny.safetensors"))


def test_saved_latents_name_the_vae_that_gives_them_meaning(clip):
    from safetensors import safe_open

    with safe_open(str(clip / "tiny.safetensors"), "pt") as f:
        assert f.metadata() == latents_metadata(TINY_WAN_PATH)
    assert clip_problem(continued({}, clip / "tiny.safetensors"), 16) is None


def test_the_clip_is_the_result_s_first_latent_frames_bit_for_bit(clip, continued_reference):
    latents = load_file(clip / "tiny.safetensors")["latents"]
    assert latents.shape[2] == CLIP_LATENT and continued_reference.shape[2] == LATENT
    assert torch.equal(continued_reference[:, :, :CLIP_LATENT], latents)
    assert torch.isfinite(continued_reference).all()


def test_the_new_frames_depend_on_the_clip(clip, continued_reference, tmp_path):
    latents = load_file(clip / "tiny.safetensors")["latents"]
    other = latents.clone()
    other[:, :, -1] = latents[:, :, 0]  # only the last frame, block 0's context (c = 1), differs
    save_file({"latents": other}, str(tmp_path / "other.safetensors"))
    result = reference_latents(continued({}, tmp_path / "other.safetensors"))
    assert torch.equal(result[:, :, :CLIP_LATENT], other)
    assert not torch.equal(result[:, :, CLIP_LATENT:], continued_reference[:, :, CLIP_LATENT:])


# ---- the command: 1, 2 and 3 stages, a prompt schedule, the join decoded as one video

SCHEDULE = [{"from_frame": 0, "prompt": "a red circle moves sideways over a striped background"},
            {"from_frame": 29, "prompt": "a blue square moves sideways over a striped background"}]


@pytest.fixture(scope="module")
def scheduled_reference(clip, tmp_path_factory):
    prompts = tmp_path_factory.mktemp("prompts") / "prompts.json"
    prompts.write_text(json.dumps(SCHEDULE))
    return prompts, reference_latents(continued(dict(prompts=SCHEDULE), clip / "tiny.safetensors"))


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_stages_continue_a_clip_bit_for_bit_with_a_prompt_schedule(clip, scheduled_reference, workdir, ranks):
    prompts, reference = scheduled_reference
    args = ("--config", TINY_CONFIG, "--frames", FRAMES, "--continue-from", clip / "tiny.safetensors",
            "--prompts", prompts, "--output", "video.mp4", "--save-latents", "latents.safetensors", "--save-frames", "f")
    result = run_generate(*args, cwd=workdir) if ranks == 1 else run_deepspeed(ranks, *args, cwd=workdir)
    assert result.returncode == 0, result.explain()
    latents = load_file(workdir / "latents.safetensors")["latents"]
    assert torch.equal(latents, reference)
    assert not torch.equal(latents, reference_latents(continued({}, clip / "tiny.safetensors")))  # the schedule counts
    frames = np.stack([iio.imread(p) for p in sorted((workdir / "f").glob("*.png"))])
    assert len(frames) == iio.imread(workdir / "video.mp4").shape[0] == FRAMES
    if ranks == 1:  # the mp4's frames are the whole latent video decoded at once: the join decodes as one video
        vae = AutoencoderKLWan.from_pretrained(TINY_WAN_PATH / "vae").eval()
        assert np.array_equal(frames, to_uint8_frames(StreamingDecoder(vae).decode(latents)))
        clip_frames = np.stack([iio.imread(p) for p in sorted((clip / "frames").glob("*.png"))])
        assert np.array_equal(frames[:CLIP_FRAMES], clip_frames)


def test_a_video_clip_continues_with_its_own_frames_first(clip, workdir):
    result = run_generate("--config", TINY_CONFIG, "--frames", FRAMES, "--continue-from", clip / "tiny.mp4",
                          "--output", "video.mp4", "--save-latents", "latents.safetensors", "--save-frames", "f",
                          cwd=workdir)
    assert result.returncode == 0, result.explain()
    own = _read_video(clip / "tiny.mp4")
    frames = np.stack([iio.imread(p) for p in sorted((workdir / "f").glob("*.png"))])
    assert len(frames) == FRAMES and np.array_equal(frames[:CLIP_FRAMES], own)
    vae = AutoencoderKLWan.from_pretrained(TINY_WAN_PATH / "vae").eval()
    latents = load_file(workdir / "latents.safetensors")["latents"]
    assert torch.equal(latents[:, :, :CLIP_LATENT], encode_video(vae, own, "cpu"))


def test_a_video_clip_of_another_length_keeps_its_last_4k_plus_1_frames(clip, tmp_path):
    from ds_dualparal.output.video import Mp4Writer

    own = _read_video(clip / "tiny.mp4")
    with Mp4Writer(tmp_path / "longer.mp4", fps=8) as writer:
        writer.append(np.concatenate([own[:2], own]))  # 23 frames: the first 2 are left out
    cfg = continued({}, tmp_path / "longer.mp4")
    assert clip_problem(cfg, 16) is None and job_timeline(cfg).prefix == CLIP_LATENT


def test_a_lora_applies_to_the_new_blocks_and_leaves_the_clip(clip, tmp_path):
    from conftest import RANDOM_TINY
    from test_lora import TINY_WAN, write_lora

    lora = write_lora(tmp_path / "style.safetensors", TINY_WAN, "diffusers")
    plain = reference_latents(continued(dict(model=str(RANDOM_TINY)), clip / "tiny.safetensors"))
    styled = reference_latents(continued(dict(model=str(RANDOM_TINY), loras=[{"path": str(lora), "scale": 2.0}]),
                                         clip / "tiny.safetensors"))
    assert torch.equal(styled[:, :, :CLIP_LATENT], plain[:, :, :CLIP_LATENT])
    assert not torch.equal(styled[:, :, CLIP_LATENT:], plain[:, :, CLIP_LATENT:])


# ---- checkpoints, jobs


def test_the_fingerprint_holds_the_clip_s_content_not_its_path(clip, tmp_path):
    shutil.copy(clip / "tiny.safetensors", tmp_path / "copy.safetensors")
    same = [fingerprint_fields(continued({}, p), TINY_WAN_PATH) for p in (clip / "tiny.safetensors", tmp_path / "copy.safetensors")]
    assert same[0] == same[1]
    latents = load_file(tmp_path / "copy.safetensors")["latents"]
    save_file({"latents": latents * 0.5}, str(tmp_path / "copy.safetensors"))
    assert fingerprint_fields(continued({}, tmp_path / "copy.safetensors"), TINY_WAN_PATH) != same[0]


def test_an_interrupted_continuation_resumes_to_the_same_latents_and_frames(clip, continued_reference, workdir):
    args = ("--config", TINY_CONFIG, "--frames", FRAMES, "--continue-from", clip / "tiny.safetensors",
            "--output", "video.mp4", "--save-latents", "latents.safetensors", "--save-frames", "f",
            "--checkpoint-dir", "ck", "--checkpoint-every", 2)
    ticks = list(DualParalSchedule(job_timeline(continued({}, clip / "tiny.safetensors")), 1, 0, checkpoint_every=2).steps())
    after_save = next(n for n, cmds in enumerate(ticks) if SaveCheckpoint(4) in cmds) + 1  # of 5 iterations
    killed = run_generate(*args, cwd=workdir, env={"DS_DUALPARAL_FAULT": f"rank=0,tick={after_save},action=kill"})
    assert killed.returncode == -9 and (workdir / "ck" / "iter_000004").is_dir(), killed.explain()
    resumed = run_generate(*args, cwd=workdir)
    assert resumed.returncode == 0 and "resuming from ck/iter_000004" in resumed.stderr, resumed.explain()
    latents = load_file(workdir / "latents.safetensors")["latents"]
    assert torch.equal(latents, continued_reference)
    vae = AutoencoderKLWan.from_pretrained(TINY_WAN_PATH / "vae").eval()
    frames = np.stack([iio.imread(p) for p in sorted((workdir / "f").glob("*.png"))])
    assert np.array_equal(frames, to_uint8_frames(StreamingDecoder(vae).decode(latents)))


def test_a_jobs_line_continues_a_clip_and_a_bad_clip_fails_only_its_job(clip, workdir):
    (workdir / "broken.safetensors").write_bytes((clip / "tiny.safetensors").read_bytes()[:-64])
    lines = [dict(name="good", frames=FRAMES, continue_from=str(clip / "tiny.safetensors"), save_latents="good.safetensors"),
             dict(name="bad", frames=FRAMES, continue_from="broken.safetensors")]
    (workdir / "jobs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = run_generate("--config", TINY_CONFIG, "--jobs", "jobs.jsonl", "--output-dir", "out", cwd=workdir)
    assert result.returncode == 1, result.explain()
    records = {r["job"]: r for r in map(json.loads, (workdir / "out" / "manifest.jsonl").read_text().splitlines())}
    assert records["good"]["status"] == "done" and records["bad"]["status"] == "failed"
    assert records["bad"]["error"].startswith("continue_from: broken.safetensors: is not a whole safetensors file")
    good = load_file(workdir / "out" / "good.safetensors")["latents"]
    assert torch.equal(good[:, :, :CLIP_LATENT], load_file(clip / "tiny.safetensors")["latents"])


# ---- bad clips: one line naming the field and what is allowed, before any weights load


def _bad_latents(tmp_path, name, tensors=None, raw=None):
    path = tmp_path / name
    if raw is not None:
        path.write_bytes(raw)
    else:
        save_file(tensors, str(path))
    return path


@pytest.fixture
def good_latents(clip):
    return load_file(clip / "tiny.safetensors")["latents"]


@pytest.mark.parametrize("case, expected", [
    ("missing", "file not found"),
    ("truncated", "is not a whole safetensors file"),
    ("garbage", "is not a whole safetensors file"),
    ("other_key", "has no 'latents' tensor (it has video)"),
    ("channels", "latents of shape (1, 48, 6, 8, 8); this model and --height/--width need (1, 16, frames, 8, 8)"),
    ("size", "latents of shape (1, 16, 6, 4, 4); this model and --height/--width need (1, 16, frames, 8, 8)"),
    ("dtype", "latents of dtype F64; allowed: float32, bfloat16, float16"),
    ("nan", "1 of 6144 latent values are not finite"),
    ("too_long", "holds 41 video frames (11 latent); --frames (41) counts the whole video, clip included: give at least 45"),
    ("other_vae", "was saved by a model with another VAE, whose latents mean other pixels"),
    ("video_size", "frames of 64x64; --width/--height are 32x32 (a clip of another size)"),
    ("not_a_video", "cannot read it as a video"),
])
def test_a_bad_clip_is_named_with_what_is_allowed(tmp_path, clip, good_latents, case, expected):
    overrides = {}
    if case == "missing":
        path = tmp_path / "nowhere.safetensors"
    elif case in ("truncated", "garbage"):
        data = (clip / "tiny.safetensors").read_bytes()
        path = _bad_latents(tmp_path, "x.safetensors", raw=data[:-64] if case == "truncated" else b"\x07" * 100)
    elif case == "other_key":
        path = _bad_latents(tmp_path, "x.safetensors", {"video": good_latents})
    elif case == "channels":
        path = _bad_latents(tmp_path, "x.safetensors", {"latents": good_latents.repeat(1, 3, 1, 1, 1)})
    elif case == "size":
        path = _bad_latents(tmp_path, "x.safetensors", {"latents": good_latents[..., :4, :4].contiguous()})
    elif case == "dtype":
        path = _bad_latents(tmp_path, "x.safetensors", {"latents": good_latents.double()})
    elif case == "nan":
        bad = good_latents.clone()
        bad[0, 3, 2, 1, 1] = float("nan")
        path = _bad_latents(tmp_path, "x.safetensors", {"latents": bad})
    elif case == "too_long":
        path = _bad_latents(tmp_path, "x.safetensors", {"latents": torch.cat([good_latents, good_latents[:, :, :5]], 2)})
    elif case == "other_vae":  # the random tiny model's VAE has the same shapes as the embedded model's
        from conftest import RANDOM_TINY

        path = tmp_path / "x.safetensors"
        save_file({"latents": good_latents}, str(path), metadata=latents_metadata(RANDOM_TINY))
    elif case == "video_size":
        path, overrides = clip / "tiny.mp4", dict(height=32, width=32)
    else:
        path = _bad_latents(tmp_path, "x.mp4", raw=b"not a video\n" * 10)
    problem = clip_problem(continued(overrides, path), 16)
    assert problem is not None and expected in problem and "\n" not in problem, problem


def test_a_bad_clip_ends_the_run_with_one_line_before_the_weights_load(clip, workdir):
    (workdir / "x.safetensors").write_bytes((clip / "tiny.safetensors").read_bytes()[:-64])
    result = run_generate("--config", TINY_CONFIG, "--frames", FRAMES, "--continue-from", "x.safetensors",
                          "--output", "video.mp4", cwd=workdir)
    assert result.returncode == 2, result.explain()
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith(
        "generate.py: error: --continue-from: x.safetensors: is not a whole safetensors file"), result.explain()
    assert "loaded" not in result.stdout + result.stderr
    assert sorted(p.name for p in workdir.iterdir()) == ["x.safetensors"]


def test_a_clip_takes_no_image_and_no_model_that_needs_one(clip):
    with_image = continued(dict(image=str(clip / "frames" / "frame_000000.png")), clip / "tiny.safetensors")
    assert clip_problem(with_image, 16) == (
        "give --image or --continue-from, not both (a continued video's first frames are the clip's)")
    assert clip_problem(continued({}, clip / "tiny.safetensors"), 16, image_model=True).startswith(
        "this image-to-video model needs an image for its condition channels")
