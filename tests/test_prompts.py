"""Prompt schedules (issue 12): the segment rule, the blend, validation, precedence over prompt,
encoding once, the fingerprint, and bit-identical latents on 1, 2, 4 stages and 2 replicas."""

import json
from fractions import Fraction

import pytest
import torch
from conftest import ROOT, TINY_CONFIG, run_deepspeed
from safetensors.torch import load_file

from ds_dualparal.cli.args import build_parser, config_from_args
from ds_dualparal.cli.checks import unused_segments
from ds_dualparal.cli.jobs import parse_job
from ds_dualparal.cli.main import main as generate_main
from ds_dualparal.config import ConfigError, load_config
from ds_dualparal.output.checkpoint import Checkpoints, ResumeError, fingerprint_fields
from ds_dualparal.pipeline.denoise import GenerationPlan, WindowBuilder
from ds_dualparal.pipeline.generation import reference_latents
from ds_dualparal.pipeline.prompts import (
    block_mixes,
    block_segments,
    prompt_plan,
    video_frames,
)
from ds_dualparal.pipeline.timeline import BlockTimeline
from ds_dualparal.toy.tiny import write_tiny_wan
from ds_dualparal.wan.weights import TINY_WAN_PATH

FOX, LAKE, NIGHT = "a fox wakes up in a snowy forest", "the fox runs across a frozen lake", "the fox sleeps at night"


def seg(frame, prompt, negative=None):
    return {"from_frame": frame, "prompt": prompt, **({} if negative is None else {"negative_prompt": negative})}


@pytest.fixture(scope="module")
def tiny():
    return load_config(TINY_CONFIG).dualparal


# ---- the segment rule and the blend (prompts.py)


def test_a_block_takes_the_segment_of_its_middle_video_frame():
    timeline = BlockTimeline(10, 2, 1, 4)  # 37 video frames: blocks of 4, 2, 2, 2 latent frames
    assert [video_frames(timeline, b) for b in range(4)] == [(0, 12), (13, 20), (21, 28), (29, 36)]
    # middle frames 6, 16, 24, 32: a change inside block 1 goes to the block boundary nearest to it
    assert block_segments([0, 16], timeline) == [0, 1, 1, 1]  # block 1 (13..20) is mostly after 16
    assert block_segments([0, 17], timeline) == [0, 0, 1, 1]  # 4 frames each side of 17: the middle (16) decides
    assert block_segments([0, 1, 2], timeline) == [2, 2, 2, 2]  # segments that own no block
    assert block_segments([0, 21, 29], timeline) == [0, 0, 1, 2]  # changes on block boundaries
    assert block_segments([0], BlockTimeline(1, 8, 8, 2)) == [0]  # one frame, one block


def test_the_blend_is_linear_over_the_transition_and_a_cut_without_one():
    segments = [0, 0, 0, 1, 1, 1]  # a change before block 3
    assert block_mixes(segments, 0) == [((s, 1),) for s in segments]
    third = Fraction(1, 3)
    assert block_mixes(segments, 2) == [
        ((0, 1),), ((0, 1),), ((0, 1 - third), (1, third)), ((0, third), (1, 1 - third)), ((1, 1),), ((1, 1),)]
    new = [dict(mix).get(1, 0) for mix in block_mixes(segments, 3)]
    assert new == [0, 0, Fraction(1, 4), Fraction(1, 2), Fraction(3, 4), 1]
    assert [dict(mix).get(1, 0) for mix in block_mixes(segments, 1)] == [0, 0, 0, Fraction(1, 2), 1, 1]
    # close changes overlap: weights stay >= 0 and sum to 1; the ends of the video are clamped
    for mix in block_mixes([0, 1, 2, 2, 3], 4):
        assert sum(w for _, w in mix) == 1 and all(w > 0 for _, w in mix)
    assert block_mixes([0, 1], 2) == [((0, Fraction(2, 3)), (1, Fraction(1, 3))), ((0, Fraction(1, 3)), (1, Fraction(2, 3)))]


def test_the_plan_names_each_distinct_text_once(tiny):
    cfg = tiny.with_overrides(num_frames=37, negative_prompt="blurry", prompts=[  # middle frames 6, 16, 24, 32
        seg(0, FOX), seg(13, LAKE, "dark"), seg(21, FOX), seg(33, NIGHT)])
    plan = prompt_plan(cfg)
    assert plan.texts == ((FOX, "blurry"), (LAKE, "dark"))  # FOX twice is one text; NIGHT owns no block
    assert plan.mixes == (((0, 1.0),), ((1, 1.0),), ((0, 1.0),), ((0, 1.0),))
    assert plan.unused == (3,)
    single = prompt_plan(tiny)
    assert single.texts == ((tiny.prompt, tiny.negative_prompt),) and set(single.mixes) == {((0, 1.0),)}


def test_window_builder_indexes_a_blocks_text_or_blends_it():
    texts = torch.randn(3, 2, 512, 8)
    plan = GenerationPlan(BlockTimeline(10, 2, 1, 4), torch.tensor([900.0]), 4, 4, (1, 2, 2), (5.0,),
                          num_texts=3, text_mixes=(((0, 1.0),), ((0, 0.5), (2, 0.5)), ((2, 1.0),), ((1, 1.0),)))
    build = WindowBuilder(plan, [], texts, "cpu")
    assert torch.equal(build.text(0), texts[0])
    assert build.text(0).data_ptr() == texts[0].data_ptr()  # indexed, not copied or recomputed
    assert torch.equal(build.text(3), texts[1])
    torch.testing.assert_close(build.text(1), (texts[0] + texts[2]) / 2, rtol=0, atol=1e-6)
    with pytest.raises(AssertionError, match="the plan has 3 text"):
        WindowBuilder(plan, [], texts[:2], "cpu")


# ---- the config, jobs lines and the command line


def error_of(section: dict) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(None, {"num_frames": 37, "block_size": 2, "context": 1, **section})
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.mark.parametrize("section, expected", [
    ({"prompts": []}, "dualparal.prompts: is empty; give at least one segment"),
    ({"prompts": [seg(4, FOX)]}, "dualparal.prompts[0]: from_frame is 4; the first segment must start at frame 0"),
    ({"prompts": [seg(0, FOX), seg(20, LAKE), seg(10, NIGHT)]},
     "dualparal.prompts[2]: from_frame 10 is not after segment 1's (20); segments go in increasing from_frame"),
    ({"prompts": [seg(0, FOX), seg(20, LAKE), seg(20, NIGHT)]},
     "dualparal.prompts[2]: from_frame 20 is not after segment 1's (20)"),
    ({"prompts": [seg(0, FOX), seg(37, LAKE)]}, "dualparal.prompts[1]: from_frame 37 is past the video's last frame (36)"),
    ({"prompts": [seg(0, FOX), seg(9, " ")]}, "dualparal.prompts[1].prompt: must not be empty"),
    ({"prompts": [seg(0, FOX), {"from_frame": 9}]}, "dualparal.prompts[1].prompt: is required"),
    ({"prompts": [seg(0, FOX), seg(-1, LAKE)]}, "dualparal.prompts[1].from_frame: -1 must be >= 0"),
    ({"prompts": [{"from_frame": 0, "prompt": FOX, "text": FOX}]}, "dualparal.prompts[0].text: unknown field; allowed fields: "
                                                    "from_frame, prompt, negative_prompt"),
    ({"prompts": FOX}, 'dualparal.prompts: "a fox wakes up in a snowy forest" must be an array of {"from_frame"'),
    ({"prompt_transition": 5}, "dualparal.prompt_transition: 5 blocks is longer than the video's 4 block(s)"),
    ({"prompt_transition": -1}, "dualparal.prompt_transition: -1 must be >= 0"),
])
def test_a_bad_schedule_is_one_line_naming_the_segment(section, expected):
    assert error_of(section).startswith(expected)


def test_prompt_and_prompts_exclude_each_other_within_a_layer_and_the_upper_layer_wins(tmp_path, tiny):
    schedule = [seg(0, FOX), seg(13, LAKE)]
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"dualparal": {"prompt": "a cat", "prompts": schedule}}))
    with pytest.raises(ConfigError, match=r"^dualparal.prompts: given together with prompt"):
        load_config(config)
    # the shipped configs carry a prompt: a --prompts flag replaces it, a --prompt flag replaces a schedule
    assert load_config(TINY_CONFIG, {"prompts": schedule}).dualparal.prompt_schedule == ((0, FOX, ""), (13, LAKE, ""))
    config.write_text(json.dumps({"dualparal": {"prompts": schedule, "num_frames": 21}}))
    assert load_config(config, {"prompt": "a cat"}).dualparal.prompt_schedule == ((0, "a cat", ""),)
    # a jobs line over the run's config, the same way
    job = parse_job(1, json.dumps({"prompts": schedule}), tiny, tmp_path)
    assert job.error is None and job.config.prompt_schedule == ((0, FOX, ""), (13, LAKE, ""))
    job = parse_job(2, json.dumps({"prompt": "a dog"}), job.config, tmp_path)
    assert job.error is None and job.config.prompt_schedule == ((0, "a dog", ""),)
    job = parse_job(3, json.dumps({"prompt": "a dog", "prompts": schedule}), tiny, tmp_path)
    assert job.error.startswith("prompts: given together with prompt")
    job = parse_job(4, json.dumps({"prompts": [seg(0, FOX), seg(30, LAKE)]}), tiny, tmp_path)  # 21 frames
    assert job.error == "prompts[1]: from_frame 30 is past the video's last frame (20)"


def test_the_prompts_flag_reads_a_json_file_and_names_the_segment(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    good = tmp_path / "story.json"
    good.write_text(json.dumps([seg(0, FOX), seg(13, LAKE, "dark")]))
    args = build_parser().parse_args(["--config", str(TINY_CONFIG), "--prompts", str(good),
                                          "--prompt-transition", "1"])
    cfg = config_from_args(args)
    assert cfg.prompt_schedule == ((0, FOX, ""), (13, LAKE, "dark")) and cfg.prompt_transition == 1
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([seg(0, FOX), seg(40, LAKE)]))
    assert generate_main(["--config", str(TINY_CONFIG), "--prompts", str(bad), "--output", "v.mp4"]) == 2
    assert capsys.readouterr().err == (
        "generate.py: error: --prompts[1]: from_frame 40 is past the video's last frame (20)\n")
    assert generate_main(["--config", str(TINY_CONFIG), "--prompts", str(good), "--prompt", "a cat"]) == 2
    assert capsys.readouterr().err.startswith("generate.py: error: --prompts: given together with prompt")
    (tmp_path / "broken.json").write_text("[{]")
    for name, words in (("broken.json", "invalid JSON at line 1"), ("none.json", "file not found")):
        with pytest.raises(SystemExit) as info:
            generate_main(["--config", str(TINY_CONFIG), "--prompts", str(tmp_path / name)])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "argument --prompts" in err and words in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json", "broken.json", "story.json"]  # nothing written


def test_the_storyline_example_config_is_valid():
    cfg = load_config(ROOT / "ds_configs" / "wan2.1-t2v-1.3b-480p-storyline.json").dualparal
    assert (cfg.num_frames, cfg.height, cfg.width, len(cfg.prompts)) == (1025, 480, 832, 3)
    assert cfg.model == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    plan = prompt_plan(cfg)
    assert len(plan.texts) == 3 and not plan.unused


# ---- encoding, the fingerprint


def test_each_distinct_prompt_is_encoded_once(monkeypatch, tiny):
    from ds_dualparal.wan import text

    calls = []
    original = text.encode_prompts
    monkeypatch.setattr(text, "encode_prompts", lambda path, triples, *a: calls.append(triples) or original(path, triples, *a))
    jobs = [tiny.with_overrides(num_frames=37, prompts=[seg(0, FOX), seg(13, LAKE), seg(25, FOX)]),
            tiny.with_overrides(prompt=LAKE), tiny.with_overrides(prompt=LAKE, guidance_scale=1.0)]
    stacked = text.encode_jobs(TINY_WAN_PATH, jobs, "cpu", torch.float32)
    assert calls == [[(FOX, "", True), (LAKE, "", True), (LAKE, "", False)]]  # one encoder load, once each
    assert [tuple(t.shape) for t in stacked] == [(2, 2, 512, 32), (1, 2, 512, 32), (1, 1, 512, 32)]
    assert torch.equal(stacked[0][1], stacked[1][0])


def test_the_schedule_is_in_the_fingerprint_and_another_is_refused_in_one_line(tmp_path, tiny):
    from test_checkpoint import saved_run

    storyline = tiny.with_overrides(prompts=[seg(0, FOX), seg(13, LAKE)])
    fields = fingerprint_fields(storyline, TINY_WAN_PATH)
    assert fields["prompts"] == [seg(0, FOX) | {"negative_prompt": None}, seg(13, LAKE) | {"negative_prompt": None}]
    folder, tl = saved_run(tmp_path, storyline)
    assert Checkpoints.open(folder.folder, 1, storyline, TINY_WAN_PATH, 99).start == 4
    for other, what in ((storyline.with_overrides(prompts=[seg(0, FOX), seg(9, LAKE)]), "prompts"),
                        (storyline.with_overrides(prompt_transition=1), "prompt_transition"),
                        (tiny, "prompt, prompts")):  # with `prompts`, `prompt` keeps its default
        with pytest.raises(ResumeError) as info:
            Checkpoints.open(folder.folder, 1, other, TINY_WAN_PATH, 99)
        assert str(info.value) == (f"--checkpoint-dir: {folder.folder / 'iter_000004'} is a checkpoint of another "
                                   f"run (different {what}); give another --checkpoint-dir or delete it")


# ---- the latents


def test_blocks_take_their_own_text_and_one_segment_is_todays_latents(tiny):
    """Without context the blocks are independent runs: each must equal the single-prompt run of its segment."""
    base = tiny.with_overrides(context=0)  # 6 latent frames in 3 blocks: video frames 0..4, 5..12, 13..20
    fox, lake = reference_latents(base.with_overrides(prompt=FOX)), reference_latents(base.with_overrides(prompt=LAKE))
    assert torch.equal(reference_latents(base.with_overrides(prompts=[seg(0, FOX)])), fox)
    story = reference_latents(base.with_overrides(prompts=[seg(0, FOX), seg(5, LAKE)]))
    assert torch.equal(story[:, :, :2], fox[:, :, :2]) and torch.equal(story[:, :, 2:], lake[:, :, 2:])


STORY = [seg(0, FOX), seg(13, LAKE, "blurry, dark"), seg(25, NIGHT)]  # 37 frames: blocks' segments 0, 1, 1, 2


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    model = write_tiny_wan(tmp_path_factory.mktemp("model") / "tiny4", num_layers=4)  # one layer per stage on 4
    cfg = load_config(TINY_CONFIG, {"model": str(model), "num_frames": 37, "prompts": STORY,
                                    "prompt_transition": 1}).dualparal
    return model, reference_latents(cfg)


@pytest.mark.parametrize("stages", [1, 2, 4])
def test_a_storyline_on_1_2_4_stages_is_the_reference_bit_for_bit(tmp_path, four_layers, stages):
    model, want = four_layers
    story = tmp_path / "story.json"
    story.write_text(json.dumps(STORY))
    result = run_deepspeed(stages, "--config", TINY_CONFIG, "--model", model, "--frames", 37, "--prompts", story,
                           "--prompt-transition", 1, "--output", "v.mp4", "--save-latents", "l.safetensors",
                           cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.explain()
    assert torch.equal(load_file(tmp_path / "l.safetensors")["latents"], want)


def test_two_replicas_run_jobs_with_their_own_schedules(tmp_path, tiny):
    """dp = 2 x pp = 2 on 4 ranks: each replica runs its own jobs (schedules and a plain prompt), all
    equal to the reference."""
    lines = [
        {"name": "a", "prompts": [seg(0, FOX), seg(13, LAKE)], "prompt_transition": 1, "save_latents": "a.safetensors"},
        {"name": "b", "frames": 37, "seed": 2, "prompts": STORY, "save_latents": "b.safetensors"},
        {"name": "c", "prompt": "a blue bird", "seed": 1, "save_latents": "c.safetensors"},
    ]
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = run_deepspeed(4, "--config", TINY_CONFIG, "--stages", 2, "--jobs", jobs, "--output-dir", "out",
                           cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.explain()
    log = result.stdout + result.stderr
    assert "replica 0/2" in log and "replica 1/2" in log
    for line in lines:
        overrides = {k: v for k, v in line.items() if k not in ("name", "save_latents", "frames")}
        want = reference_latents(tiny.with_overrides(num_frames=line.get("frames", 21), **overrides))
        assert torch.equal(load_file(tmp_path / "out" / line["save_latents"])["latents"], want), line["name"]


def test_a_segment_that_no_block_takes_is_said(tiny):
    cfg = tiny.with_overrides(prompts=[seg(0, FOX), seg(14, LAKE), seg(18, NIGHT)])  # middle frames 6, 16
    assert unused_segments(cfg) == [
        "prompts[2] (from_frame 18) holds no block's middle frame, so no block takes its prompt; "
        "make it at least a block (8 video frames) long"]
    assert unused_segments(tiny) == []
