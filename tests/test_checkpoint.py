"""Checkpoint and resume: where the schedule saves, what a resumed schedule runs, the state on disk
round-tripping bit for bit, refusals, and interrupted runs resumed to the uninterrupted latents."""

import copy
import json
import shutil

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from conftest import TINY_CONFIG, run_deepspeed, run_generate, run_main
from safetensors.torch import load_file

from ds_dualparal.cli.args import build_parser, check_args, config_from_args
from ds_dualparal.config import LATENTS_FIELDS, ConfigError, load_config
from ds_dualparal.output.checkpoint import Checkpoints, ResumeError, fingerprint_fields
from ds_dualparal.pipeline.denoise import (
    BlockLatents,
    GenerationPlan,
    SchedulerStateError,
    block_scheduler,
    make_scheduler,
    scheduler_state,
)
from ds_dualparal.pipeline.schedule import (
    DualParalSchedule,
    ForwardLayers,
    LoadWindow,
    RecvActivation,
    RecvPrediction,
    SaveCheckpoint,
    SchedulerStep,
    SendActivation,
    SendPrediction,
    block_steps_from,
    stage_streams,
)
from ds_dualparal.pipeline.timeline import BlockTimeline
from ds_dualparal.wan.weights import TINY_WAN_PATH

# ---- the schedule: where checkpoints are taken, and what a resumed run does


def timelines():
    for blocks in range(1, 6):
        for steps in range(1, 5):
            yield BlockTimeline(blocks * 2 + 1, 2, 1, steps)


@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_a_checkpoint_follows_every_update_of_earlier_iterations_and_precedes_the_later(stages):
    for tl in timelines():
        for every in (1, 2, 3):
            for start in range(tl.num_iterations):
                streams = stage_streams(tl, stages, start, every)
                first = streams[0]
                saves = [n for n, cmd in enumerate(first) if isinstance(cmd, SaveCheckpoint)]
                assert [first[n].iteration for n in saves] == [
                    i for i in range(start + 1, tl.num_iterations) if i % every == 0]
                for n in saves:
                    i = first[n].iteration
                    updates = [c for c in first if isinstance(c, SchedulerStep)]
                    before = {(c.block, c.step) for c in first[:n] if isinstance(c, SchedulerStep)}
                    assert before == {(c.block, c.step) for c in updates if c.block + c.step < i}
                for stream in streams[1:]:
                    assert not any(isinstance(cmd, SaveCheckpoint) for cmd in stream)


def keys(stream, kind):
    return [(cmd.block, cmd.step) for cmd in stream if type(cmd) is kind]


@pytest.mark.parametrize("stages", [1, 2, 3, 5])
def test_a_resumed_schedule_runs_exactly_the_later_block_steps_and_pairs_every_message(stages):
    for tl in timelines():
        for start in range(tl.num_iterations):
            order = [(bs.block, bs.step) for bs in block_steps_from(tl, start)]
            assert order and all(b + s >= start for b, s in order)
            ticks = [list(DualParalSchedule(tl, stages, p, start).steps()) for p in range(stages)]
            assert len({len(t) for t in ticks}) == 1
            streams = [[c for cmds in t for c in cmds] for t in ticks]
            for stream in streams:
                assert keys(stream, ForwardLayers) == order
            for p in range(stages - 1):
                assert keys(streams[p], SendActivation) == keys(streams[p + 1], RecvActivation) == order
            if stages > 1:
                assert keys(streams[-1], SendPrediction) == keys(streams[0], RecvPrediction) == order
            for n in range(len(ticks[0])):  # both ends of every message in the same tick
                tick = [(p, c) for p in range(stages) for c in ticks[p][n]]
                sent = {(p + 1, c.block, c.step) for p, c in tick if isinstance(c, SendActivation)}
                sent |= {(0, c.block, c.step) for p, c in tick if isinstance(c, SendPrediction)}
                received = {(p, c.block, c.step) for p, c in tick if isinstance(c, (RecvActivation, RecvPrediction))}
                assert sent == received
            applied = set()
            for cmd in streams[0]:
                if isinstance(cmd, SchedulerStep):
                    applied.add((cmd.block, cmd.step))
                elif isinstance(cmd, LoadWindow):
                    for b, i in tl.dependencies(cmd.block, cmd.block + cmd.step):
                        assert i < start or (b, i - b) in applied


def test_resuming_at_iteration_zero_is_the_whole_schedule():
    tl = BlockTimeline(9, 2, 1, 3)
    assert stage_streams(tl, 3, start=0) == stage_streams(tl, 3)


@pytest.mark.parametrize("start, every", [(-1, None), (7, None), (0, 0)])
def test_schedule_rejects_bad_start_or_interval(start, every):
    with pytest.raises(ValueError):
        DualParalSchedule(BlockTimeline(9, 2, 1, 3), 2, 0, start, every)  # 4 blocks x 3 steps: iterations 0..5


# ---- the state on disk


def plan_for(kind, tl):
    scheduler = make_scheduler(kind, 3.0, tl.num_steps, TINY_WAN_PATH / "scheduler")
    plan = GenerationPlan(tl, scheduler.timesteps.clone(), 4, 4, (1, 2, 2), (5.0,))
    return plan, scheduler


def step_through(latents, plan, predictions, start, stop):
    for bs in plan.timeline.block_steps():
        if start <= bs.iteration < stop:
            latents.step(bs.block, bs.step, predictions[bs.block, bs.step])


@pytest.fixture(scope="module")
def base_cfg():
    return load_config(TINY_CONFIG).dualparal


def folder_for(tmp_path, cfg, every=1, start=0):
    return Checkpoints(tmp_path / "ck", every, fingerprint_fields(cfg, TINY_WAN_PATH), start)


@pytest.mark.parametrize("kind", ["unipc", "euler"])
def test_saved_latents_and_schedulers_continue_bit_for_bit(tmp_path, base_cfg, kind):
    tl = BlockTimeline(num_frames=9, block_size=2, context=1, num_steps=5)  # 4 blocks, block 0 of 3 frames
    plan, scheduler = plan_for(kind, tl)
    generator = torch.Generator().manual_seed(0)
    noise = [torch.randn(1, 4, tl.block_len(b), 4, 4, generator=generator) for b in range(tl.num_blocks)]
    predictions = {(bs.block, bs.step): torch.randn(1, 4, tl.block_len(bs.block), 4, 4, generator=generator)
                   for bs in tl.block_steps()}
    whole = BlockLatents(plan, noise, scheduler, "cpu")
    step_through(whole, plan, predictions, 0, tl.num_iterations)
    for iteration in range(1, tl.num_iterations):
        first = BlockLatents(plan, noise, scheduler, "cpu")
        step_through(first, plan, predictions, 0, iteration)
        folder_for(tmp_path, base_cfg).save(iteration, first)
        resume = folder_for(tmp_path, base_cfg, start=iteration).load(plan, torch.device("cpu"))
        started = {b for b in range(tl.num_blocks) if b < iteration <= b + tl.num_steps - 1}
        assert set(resume.schedulers) == started
        second = BlockLatents(plan, resume.latents, scheduler, "cpu", resume.schedulers)
        step_through(second, plan, predictions, iteration, tl.num_iterations)
        for a, b in zip(second.latents, whole.latents):
            assert torch.equal(a, b), (kind, iteration)


def test_a_scheduler_attribute_the_checkpoint_would_miss_is_caught():
    fresh = block_scheduler(make_scheduler("unipc", 3.0, 2, TINY_WAN_PATH / "scheduler"))
    changed = copy.deepcopy(fresh)
    assert scheduler_state(changed, fresh)["steps_taken"] == 0
    changed._sigmas = changed._sigmas * 2
    with pytest.raises(SchedulerStateError, match="_sigmas"):
        scheduler_state(changed, fresh)


def saved_run(tmp_path, cfg, iterations=(2, 4)):
    tl = BlockTimeline(cfg.latent_frames, cfg.block_size, cfg.context, cfg.num_inference_steps)
    plan, scheduler = plan_for(cfg.scheduler, tl)
    size = (cfg.height // 8, cfg.width // 8)  # the latents of `cfg`, as a resumed run checks
    zeros = [torch.zeros(1, 4, tl.block_len(b), *size) for b in range(tl.num_blocks)]
    latents = BlockLatents(plan, zeros, scheduler, "cpu")
    predictions = {(bs.block, bs.step): torch.zeros_like(zeros[bs.block]) for bs in tl.block_steps()}
    folder = folder_for(tmp_path, cfg)
    done = 0
    for iteration in iterations:  # the schedulers' states of a real run (resume checks them step by step)
        step_through(latents, plan, predictions, done, iteration)
        folder.save(iteration, latents)
        done = iteration
    return folder, tl


def test_the_newest_complete_checkpoint_is_kept_and_found(tmp_path, base_cfg):
    folder, tl = saved_run(tmp_path, base_cfg)
    assert sorted(p.name for p in folder.folder.iterdir()) == ["iter_000004"]
    assert sorted(p.name for p in (folder.folder / "iter_000004").iterdir()) == [
        "latents.safetensors", "manifest.json", "schedulers.safetensors", "state.json"]
    # a checkpoint cut short by a kill: a partial folder, or a folder without its manifest
    (folder.folder / ".iter_000006.partial").mkdir()
    (folder.folder / "iter_000008").mkdir()
    opened = Checkpoints.open(folder.folder, 1, base_cfg, TINY_WAN_PATH, tl.num_iterations)
    assert opened.start == 4
    folder.clear()
    assert sorted(p.name for p in folder.folder.iterdir()) == ["iter_000008"]  # not a checkpoint: left alone
    assert Checkpoints.open(folder.folder, 1, base_cfg, TINY_WAN_PATH, tl.num_iterations).start == 0
    assert Checkpoints.open(tmp_path / "missing", 1, base_cfg, TINY_WAN_PATH, tl.num_iterations).start == 0


@pytest.mark.parametrize("change", [dict(prompt="a dog"), dict(seed=1, num_inference_steps=5), dict(dtype="bfloat16")])
def test_a_checkpoint_of_another_run_is_refused(tmp_path, base_cfg, change):
    folder, tl = saved_run(tmp_path, base_cfg)
    with pytest.raises(ResumeError) as info:
        Checkpoints.open(folder.folder, 1, base_cfg.with_overrides(**change), TINY_WAN_PATH, 99)
    assert str(info.value) == (f"--checkpoint-dir: {folder.folder / 'iter_000004'} is a checkpoint of another run "
                               f"(different {', '.join(sorted(change))}); give another --checkpoint-dir or delete it")


def test_every_field_the_latents_depend_on_is_in_the_fingerprint(base_cfg):
    from ds_dualparal.wan.modelcheck import weights_fingerprint

    fields = fingerprint_fields(base_cfg, TINY_WAN_PATH)
    assert set(fields) == set(LATENTS_FIELDS) | {"format"}
    values = base_cfg.model_dump(mode="json")
    for name in LATENTS_FIELDS:
        expected = weights_fingerprint(TINY_WAN_PATH) if name == "model" else values[name]
        assert fields[name] == expected, name


def test_what_the_output_does_not_depend_on_is_not_in_the_fingerprint(tmp_path, base_cfg):
    folder, tl = saved_run(tmp_path, base_cfg)
    other = base_cfg.with_overrides(output="elsewhere.mp4", fps=30, pipeline_stages=2, partition_method="uniform",
                                    comm_timeout_s=5, save_latents="x.safetensors")
    assert Checkpoints.open(folder.folder, 3, other, TINY_WAN_PATH, tl.num_iterations).start == 4


def test_a_checkpoint_of_an_earlier_format_is_refused_as_such(tmp_path, base_cfg):
    from ds_dualparal.output.checkpoint import FORMAT, MANIFEST

    folder, tl = saved_run(tmp_path, base_cfg)
    path = folder.folder / "iter_000004"
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["format"] = manifest["fields"]["format"] = 2  # diffusers' UniPC state (format 2)
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ResumeError) as info:
        Checkpoints.open(folder.folder, 1, base_cfg, TINY_WAN_PATH, tl.num_iterations)
    assert str(info.value) == (f"--checkpoint-dir: {path} was written by an earlier version of ds_dualparal "
                               f"(checkpoint format 2; this version reads format {FORMAT}); resume it with that "
                               "version, or delete it to start over")


@pytest.mark.parametrize("damage", ["latents", "manifest", "state"])
def test_a_damaged_checkpoint_is_refused(tmp_path, base_cfg, damage):
    folder, tl = saved_run(tmp_path, base_cfg)
    path = folder.folder / "iter_000004"
    if damage == "latents":
        data = bytearray((path / "latents.safetensors").read_bytes())
        data[-1] ^= 1
        (path / "latents.safetensors").write_bytes(bytes(data))
    elif damage == "manifest":
        (path / "manifest.json").write_text("{")
    else:
        (path / "state.json").write_text('{"iteration": 4}')
    with pytest.raises(ResumeError, match=f"{path} is damaged .*; delete it to start over"):
        Checkpoints.open(folder.folder, 1, base_cfg, TINY_WAN_PATH, tl.num_iterations)


# ---- the flags


def check(*argv):
    args = build_parser().parse_args(["--config", str(TINY_CONFIG), *map(str, argv)])
    check_args(args, config_from_args(args))


@pytest.mark.parametrize("argv, error", [
    (["--checkpoint-dir", "ck"], "--checkpoint-dir and --checkpoint-every N go together"),
    (["--checkpoint-every", "2"], "--checkpoint-dir and --checkpoint-every N go together"),
    (["--checkpoint-dir", "ck", "--checkpoint-every", "0"], "--checkpoint-every: 0 must be an integer >= 1"),
    (["--jobs", "j.jsonl", "--output-dir", "out", "--checkpoint-dir", "ck", "--checkpoint-every", "2"],
     "--checkpoint-dir: checkpoints are for a single video, not for --jobs"),
])
def test_checkpoint_flags_that_do_not_go_together(argv, error):
    with pytest.raises(ConfigError, match=error):
        check(*argv)
    check("--checkpoint-dir", "ck", "--checkpoint-every", "1")


def test_checkpoints_with_jobs_stop_the_run_with_one_line(workdir):
    result = run_main("--config", TINY_CONFIG, "--jobs", "j.jsonl", "--output-dir", "out",
                      "--checkpoint-dir", "ck", "--checkpoint-every", 2, cwd=workdir)
    assert result.returncode == 2, result.explain()
    assert result.stderr.splitlines() == [
        "generate.py: error: --checkpoint-dir: checkpoints are for a single video, not for --jobs "
        "(--resume skips done jobs)"]
    assert list(workdir.iterdir()) == []


# ---- interrupted runs resumed: bit-identical to the uninterrupted one (tiny_single_run)

EVERY = 2
ARGS = ("--config", TINY_CONFIG, "--output", "video.mp4", "--save-latents", "latents.safetensors",
        "--save-frames", "frames", "--checkpoint-dir", "ck", "--checkpoint-every", EVERY)


def kill_after_checkpoint(iteration, stages, rank=0):
    """A DS_DUALPARAL_FAULT that kills `rank` in the tick after stage 0 saved the checkpoint at `iteration`."""
    cfg = load_config(TINY_CONFIG).dualparal
    tl = BlockTimeline(cfg.latent_frames, cfg.block_size, cfg.context, cfg.num_inference_steps)
    ticks = list(DualParalSchedule(tl, stages, 0, checkpoint_every=EVERY).steps())
    saved = next(n for n, cmds in enumerate(ticks) if SaveCheckpoint(iteration) in cmds)
    assert saved + 1 < len(ticks)
    return {"DS_DUALPARAL_FAULT": f"rank={rank},tick={saved + 1},action=kill"}


def assert_interrupted(result, cwd, iteration):
    assert result.returncode != 0, result.explain()
    assert "DS_DUALPARAL_FAULT: kill" in result.stdout + result.stderr
    assert [p.name for p in (cwd / "ck").iterdir()] == [f"iter_{iteration:06d}"]
    assert not (cwd / "video.mp4").exists() and not (cwd / "latents.safetensors").exists()


def assert_same_as_uninterrupted(result, cwd, tiny_single_run, iteration):
    assert result.returncode == 0, result.explain()
    assert f"resuming from ck/iter_{iteration:06d}: iteration {iteration} of 5" in result.stdout + result.stderr
    reference, _ = tiny_single_run
    assert torch.equal(load_file(cwd / "latents.safetensors")["latents"],
                       load_file(reference / "tiny.safetensors")["latents"])
    frames = sorted((cwd / "frames").glob("*.png"))
    assert [p.name for p in frames] == [p.name for p in sorted((reference / "frames").glob("*.png"))]
    for ours in frames:
        assert np.array_equal(iio.imread(ours), iio.imread(reference / "frames" / ours.name))
    assert iio.imread(cwd / "video.mp4").shape[0] == len(frames) == 21
    assert list((cwd / "ck").iterdir()) == []  # the video is out: nothing left to resume
    assert not any(p.name.startswith(".") for p in cwd.iterdir())  # no partial files


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """One process killed after the checkpoint at iteration 4 of 5: block 0 was already final."""
    cwd = tmp_path_factory.mktemp("interrupted")
    result = run_generate(*ARGS, cwd=cwd, env=kill_after_checkpoint(4, stages=1))
    assert result.returncode == -9, result.explain()
    assert_interrupted(result, cwd, 4)
    return cwd


def test_resume_gives_the_uninterrupted_latents_and_every_frame(interrupted, tmp_path, tiny_single_run):
    cwd = shutil.copytree(interrupted, tmp_path / "run")
    result = run_generate(*ARGS, cwd=cwd)
    assert_same_as_uninterrupted(result, cwd, tiny_single_run, 4)


def test_resume_with_another_prompt_is_refused_with_one_line(interrupted, tmp_path):
    cwd = shutil.copytree(interrupted, tmp_path / "run")
    result = run_main(*ARGS, "--prompt", "a dog", cwd=cwd)
    assert result.returncode == 2, result.explain()
    assert result.stderr.splitlines() == [
        "generate.py: error: --checkpoint-dir: ck/iter_000004 is a checkpoint of another run (different prompt); "
        "give another --checkpoint-dir or delete it"]
    assert sorted(p.name for p in cwd.iterdir()) == sorted(p.name for p in interrupted.iterdir())
    manifest = json.loads((cwd / "ck" / "iter_000004" / "manifest.json").read_text())
    assert manifest["iteration"] == 4 and manifest["fields"]["prompt"] == "a red circle moves sideways over a striped background"


def test_two_ranks_interrupted_and_resumed_give_the_uninterrupted_latents(workdir, tiny_single_run):
    """Rank 0 (stage 0 of 2) dies after the checkpoint at iteration 2; the rerun on 2 ranks continues from it."""
    killed = run_deepspeed(2, *ARGS, cwd=workdir, env=kill_after_checkpoint(2, stages=2))
    assert_interrupted(killed, workdir, 2)
    resumed = run_deepspeed(2, *ARGS, cwd=workdir)
    assert_same_as_uninterrupted(resumed, workdir, tiny_single_run, 2)


def test_another_model_at_the_same_path_is_another_run(tmp_path, base_cfg):
    model = shutil.copytree(TINY_WAN_PATH, tmp_path / "model")
    tl = BlockTimeline(base_cfg.latent_frames, base_cfg.block_size, base_cfg.context, base_cfg.num_inference_steps)
    folder, _ = saved_run(tmp_path, base_cfg)
    # saved_run fingerprints the tiny model; the same weights elsewhere resume
    assert Checkpoints.open(folder.folder, 1, base_cfg, model, tl.num_iterations).start == 4
    shard = sorted((model / "transformer").glob("*-of-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x55  # other weights of the same shapes
    shard.write_bytes(bytes(data))
    with pytest.raises(ResumeError, match=r"is a checkpoint of another run \(different model\)"):
        Checkpoints.open(folder.folder, 1, base_cfg, model, tl.num_iterations)


def test_a_checkpoint_whose_files_disagree_with_its_manifest_is_refused_when_opened(tmp_path, base_cfg):
    """Files whose digests match the manifest but whose content does not (another iteration's state,
    latents of another size) are refused before the run starts, not in the middle of it."""
    from ds_dualparal.output.checkpoint import _digest

    folder, tl = saved_run(tmp_path, base_cfg)
    path = folder.folder / "iter_000004"
    state = json.loads((path / "state.json").read_text())
    (path / "state.json").write_text(json.dumps({**state, "iteration": 2}))
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["state.json"] = _digest(path / "state.json")
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ResumeError, match=f"{path} is damaged \\(state.json is not of iteration 4\\)"):
        Checkpoints.open(folder.folder, 1, base_cfg, TINY_WAN_PATH, tl.num_iterations)
    (path / "latents.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"{}")  # not the tensors it should hold
    manifest["files"]["latents.safetensors"] = _digest(path / "latents.safetensors")
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ResumeError, match=f"{path} is damaged"):
        Checkpoints.open(folder.folder, 1, base_cfg, TINY_WAN_PATH, tl.num_iterations)


def test_a_checkpoint_that_cannot_be_written_is_skipped_and_leaves_nothing(tmp_path, base_cfg, monkeypatch, caplog):
    folder, tl = saved_run(tmp_path, base_cfg, iterations=(2,))

    def disk_full(path, tensors):
        path.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("ds_dualparal.output.checkpoint._save_tensors", disk_full)
    plan, scheduler = plan_for(base_cfg.scheduler, tl)
    latents = BlockLatents(plan, [torch.zeros(1, 4, tl.block_len(b), 8, 8) for b in range(tl.num_blocks)],
                           scheduler, "cpu")
    assert folder.save(4, latents) is None
    assert "not saved (No space left on device); the run goes on" in caplog.text
    assert [p.name for p in folder.folder.iterdir()] == ["iter_000002"]  # the older one stays
