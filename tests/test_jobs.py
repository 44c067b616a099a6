"""Batch jobs: parsing a jobs file line by line, the manifest, resume, and data-parallel replicas sharing jobs."""

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import TINY_CONFIG, run_deepspeed, run_generate
from safetensors.torch import load_file

from ds_dualparal.cli.args import build_parser, check_args, config_from_args
from ds_dualparal.cli.checks import plan_jobs
from ds_dualparal.cli.jobs import (
    MANIFEST,
    MODEL_FIELDS,
    done_outputs,
    parse_job,
    read_jobs,
    record,
)
from ds_dualparal.config import ConfigError, load_config


@pytest.fixture(scope="module")
def base():
    return load_config(TINY_CONFIG).dualparal


def parse(line, base, out=Path("/out"), index=1):
    return parse_job(index, line if isinstance(line, str) else json.dumps(line), base, out)


# ---- one line -> one job


def test_defaults_come_from_the_run_config_and_the_output_from_the_line_number(base):
    job = parse({"prompt": "a dog"}, base, index=7)
    assert job.error is None
    assert (job.name, job.output, job.relative) == ("job_0007", Path("/out/job_0007.mp4"), "job_0007.mp4")
    assert job.config.prompt == "a dog"
    assert job.config.output == "/out/job_0007.mp4"
    assert job.config.height == base.height and job.config.seed == base.seed


def test_per_job_overrides_and_flag_aliases(base):
    job = parse({"frames": 17, "steps": 2, "guidance": 1.0, "seed": 5, "height": 32, "block_size": 3,
                 "context": 0, "scheduler": "euler", "negative_prompt": "blurry", "fps": 4}, base)
    assert job.error is None
    cfg = job.config
    assert (cfg.num_frames, cfg.num_inference_steps, cfg.guidance_scale, cfg.seed) == (17, 2, 1.0, 5)
    assert (cfg.height, cfg.block_size, cfg.context, cfg.scheduler) == (32, 3, 0, "euler")
    assert (cfg.negative_prompt, cfg.fps) == ("blurry", 4)


def test_a_model_level_field_is_refused_under_its_flag_name_too(base):
    assert parse({"stages": 2}, base).error == "pipeline_stages: is a setting of the whole run and cannot change per job"


def test_alias_and_long_name_together_are_refused(base):
    assert parse({"frames": 17, "num_frames": 21}, base).error == "frames: given together with num_frames, its long name"


def test_a_key_given_twice_is_refused(base):
    assert parse('{"seed": 1, "seed": 2}', base).error == "seed: given twice"


@pytest.mark.parametrize("key", MODEL_FIELDS)
def test_model_level_fields_are_refused_per_job(base, key):
    job = parse({key: "x"}, base)
    assert job.config is None
    assert job.error == f"{key}: is a setting of the whole run and cannot change per job"


def test_name_gives_the_default_output_and_must_be_a_plain_file_name(base):
    job = parse({"name": "cat"}, base)
    assert (job.name, job.output) == ("cat", Path("/out/cat.mp4"))
    assert parse({"name": "a/b"}, base).error.startswith("name: 'a/b' must be a plain file name")
    assert parse({"name": ".."}, base).error is not None
    assert parse({"name": ""}, base).error == "name: must be a non-empty string"


def test_outputs_stay_inside_the_output_dir(base):
    job = parse({"output": "sub/x.mp4", "save_latents": "lat/x.safetensors"}, base)
    assert job.error is None
    assert (job.output, job.relative) == (Path("/out/sub/x.mp4"), "sub/x.mp4")
    assert job.config.save_latents == "/out/lat/x.safetensors"
    for key in ("output", "save_latents"):
        for path in ("../x.mp4", "a/../../x.mp4", "/tmp/x.mp4", "."):
            job = parse({key: path}, base)
            assert job.config is None
            assert job.error == f"{key}: {path!r} must be a relative path inside --output-dir"
    assert parse({"output": "x.avi"}, base).error == "output: 'x.avi' must end in .mp4"
    assert parse({"output": 3}, base).error == "output: must be a non-empty string"


def test_latents_are_saved_only_when_the_job_asks(base):
    assert parse({}, base.with_overrides(save_latents="/elsewhere.safetensors")).config.save_latents is None


@pytest.mark.parametrize(
    "line, error",
    [
        ('{"prompt": "a cat"', "invalid JSON at column 19: Expecting ',' delimiter"),
        ("[1, 2]", "each line must be a JSON object, got list"),
        ('"a cat"', "each line must be a JSON object, got str"),
        ('{"frames": 20}', "num_frames: 20 is not 4k+1; nearest valid: 17 or 21"),
        ('{"height": 70}', "height: 70 is not a multiple of 16; nearest valid: 64 or 80"),
        ('{"scheduler": "ddim"}', "scheduler: \"ddim\" is not allowed; expected 'unipc' or 'euler'"),
        ('{"colour": "red"}', "colour: unknown field; allowed fields:"),
    ],
)
def test_a_bad_line_becomes_a_failed_job(base, line, error):
    job = parse(line, base)
    assert job.config is None
    assert job.error.startswith(error)
    assert "\n" not in job.error


# ---- a whole file


def test_read_jobs_keeps_line_numbers_and_fails_only_the_bad_lines(tmp_path, base):
    jobs_file = tmp_path / "jobs.jsonl"
    jobs_file.write_text('{"prompt": "a"}\n\n{"frames": 20}\n{"prompt": "c"}\n')
    jobs = read_jobs(jobs_file, base, tmp_path / "out")
    assert [(j.index, j.name, j.error is None) for j in jobs] == [
        (1, "job_0001", True), (3, "job_0003", False), (4, "job_0004", True),
    ]


def test_two_jobs_writing_one_file_make_the_later_fail(tmp_path, base):
    jobs_file = tmp_path / "jobs.jsonl"
    lines = [
        {"output": "a.mp4"},
        {"output": "./a.mp4"},
        {"output": "b.mp4", "save_latents": "l.safetensors"},
        {"output": "c.mp4", "save_latents": "l.safetensors"},
        {"output": "d.mp4", "save_latents": "b.mp4"},
    ]
    jobs_file.write_text("".join(json.dumps(line) + "\n" for line in lines))
    jobs = read_jobs(jobs_file, base, tmp_path / "out")
    assert [j.error for j in jobs] == [
        None,
        "output: a.mp4 is also written by line 1",
        None,
        "output: l.safetensors is also written by line 3",
        "output: b.mp4 is also written by line 3",
    ]


@pytest.mark.parametrize("text, error", [(None, "--jobs: cannot read"), ("\n  \n", "holds no jobs")])
def test_unreadable_or_empty_jobs_file(tmp_path, base, text, error):
    jobs_file = tmp_path / "jobs.jsonl"
    if text is not None:
        jobs_file.write_text(text)
    with pytest.raises(ConfigError, match=error):
        read_jobs(jobs_file, base, tmp_path)


def test_done_outputs_are_done_records_whose_file_exists(tmp_path):
    (tmp_path / "a.mp4").write_bytes(b"x")
    (tmp_path / "c.mp4").write_bytes(b"x")
    record(tmp_path, {"status": "done", "output": "a.mp4"})
    record(tmp_path, {"status": "done", "output": "b.mp4"})  # since deleted
    record(tmp_path, {"status": "failed", "output": "c.mp4"})
    with open(tmp_path / MANIFEST, "a") as f:
        f.write('{"status": "done", "outp')  # cut short by a killed run
    assert done_outputs(tmp_path) == {"a.mp4"}
    assert done_outputs(tmp_path / "missing") == set()


def test_a_record_after_a_torn_line_is_whole_and_counts(tmp_path):
    """A crash while appending leaves a line cut short (here mid-character); the next record is not glued to it."""
    (tmp_path / "a.mp4").write_bytes(b"x")
    (tmp_path / "b.mp4").write_bytes(b"x")
    record(tmp_path, {"status": "done", "output": "a.mp4"})
    with open(tmp_path / MANIFEST, "ab") as f:
        f.write('{"status": "done", "job": "\u00e9'.encode()[:-1])
    assert record(tmp_path, {"status": "done", "output": "b.mp4"})
    assert done_outputs(tmp_path) == {"a.mp4", "b.mp4"}


def test_a_manifest_that_cannot_be_written_is_logged_not_raised(tmp_path, caplog):
    (tmp_path / MANIFEST).mkdir()
    assert record(tmp_path, {"job": "a", "status": "done"}) is False
    assert f"manifest {tmp_path / MANIFEST}: cannot record job a" in caplog.text


# ---- decisions of the command line


def args_of(*argv):
    return build_parser().parse_args(["--config", str(TINY_CONFIG), *map(str, argv)])


def decide(*argv):
    args = args_of(*argv)
    cfg = config_from_args(args)
    check_args(args, cfg)
    return plan_jobs(args, cfg)


@pytest.mark.parametrize(
    "argv, error",
    [
        (["--jobs", "j.jsonl", "--output-dir", "out", "--output", "a.mp4"], "--output: names a single video"),
        (["--jobs", "j.jsonl", "--output-dir", "out", "--save-latents", "a.st"], "--save-latents: names a single file"),
        (["--resume"], "--output-dir and --resume go with --jobs"),
    ],
)
def test_flags_that_do_not_go_together(argv, error):
    with pytest.raises(ConfigError, match=error):
        decide(*argv)


def test_existing_latents_are_refused_without_overwrite(tmp_path):
    latents = tmp_path / "l.safetensors"
    latents.write_bytes(b"x")
    argv = ["--output", tmp_path / "v.mp4", "--save-latents", latents]
    with pytest.raises(ConfigError, match="--save-latents: .* already exists; pass --overwrite"):
        decide(*argv)
    assert decide(*argv, "--overwrite")[0].config.save_latents == str(latents)


def test_plan_skips_done_jobs_on_resume_and_fails_existing_outputs(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    jobs_file = tmp_path / "jobs.jsonl"
    jobs_file.write_text('{"name": "a"}\n{"name": "b"}\n{"name": "c"}\n')
    for name in "ab":
        (out / f"{name}.mp4").write_bytes(b"x")
    record(out, {"status": "done", "output": "a.mp4"})
    argv = ["--jobs", jobs_file, "--output-dir", out]

    a, b, c = decide(*argv, "--resume")
    assert a.done and a.error is None and not a.unrecorded
    # b.mp4 is complete (outputs are renamed whole) but unrecorded: a run stopped before its manifest line
    assert b.done and b.unrecorded and b.error is None
    assert c.error is None and not c.done

    b_latents = '{"name": "b", "save_latents": "b.safetensors"}'
    jobs_file.write_text('{"name": "a"}\n' + b_latents + '\n{"name": "c"}\n')
    a, b, c = decide(*argv, "--resume")  # its latents (written before the mp4) are missing: not that run's
    assert b.error == f"output: {out / 'b.mp4'} already exists; pass --overwrite to replace it"

    a, b, c = decide(*argv, "--overwrite")  # without --resume nothing is skipped
    assert [j.error for j in (a, b, c)] == [None, None, None] and not a.done


# ---- end to end: a batch with a bad line, resume, and two data-parallel replicas

CAT = {"name": "cat", "prompt": "a cat walks on the grass", "seed": 1, "save_latents": "cat.safetensors"}
DOG = {"name": "dog", "prompt": "a dog runs on the beach", "seed": 2, "frames": 17, "output": "sub/dog.mp4",
       "save_latents": "latents/dog.safetensors"}
BAD = {"name": "bad", "frames": 20}


def write_jobs(path, *jobs):
    path.write_text("".join(json.dumps(job) + "\n" for job in jobs))
    return path


def manifest(out):
    return [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """One process runs cat, a bad line and dog: what it wrote and its manifest, before any rerun."""
    cwd = tmp_path_factory.mktemp("batch")
    jobs_file = write_jobs(cwd / "jobs.jsonl", CAT, BAD, DOG)
    result = run_generate("--config", TINY_CONFIG, "--jobs", jobs_file, "--output-dir", "out", cwd=cwd)
    assert result.returncode == 1, result.explain()  # the good jobs ran; the exit code says one failed
    assert "Traceback" not in result.stderr
    out = cwd / "out"
    return cwd, out, manifest(out)


def test_batch_runs_the_good_jobs_and_records_the_bad_line(batch):
    _, out, records = batch
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "cat.mp4", "cat.safetensors", "latents/dog.safetensors", MANIFEST, "sub/dog.mp4",
    ]
    assert load_file(out / "cat.safetensors")["latents"].shape == (1, 16, 6, 8, 8)
    assert load_file(out / "latents/dog.safetensors")["latents"].shape == (1, 16, 5, 8, 8)
    by_job = {r["job"]: r for r in records}
    assert len(records) == 3 and set(by_job) == {"cat", "bad", "dog"}
    assert by_job["bad"]["status"] == "failed" and by_job["bad"]["line"] == 2
    assert by_job["bad"]["error"] == "num_frames: 20 is not 4k+1; nearest valid: 17 or 21"
    for name, output in (("cat", "cat.mp4"), ("dog", "sub/dog.mp4")):
        assert by_job[name]["status"] == "done" and by_job[name]["error"] is None
        assert by_job[name]["output"] == output and by_job[name]["seconds"] > 0


def test_resume_skips_done_jobs_and_retries_the_failed_one(batch):
    cwd, out, records = batch
    mtimes = {p: os.stat(p).st_mtime_ns for p in (out / "cat.mp4", out / "sub/dog.mp4", out / "cat.safetensors")}
    fixed = {**BAD, "frames": 5, "steps": 1}
    write_jobs(cwd / "jobs.jsonl", CAT, fixed, DOG)

    result = run_generate("--config", TINY_CONFIG, "--jobs", "jobs.jsonl", "--output-dir", "out", "--resume", cwd=cwd)
    assert result.returncode == 0, result.explain()
    assert {p: os.stat(p).st_mtime_ns for p in mtimes} == mtimes
    new = manifest(out)[len(records):]
    assert [(r["job"], r["status"]) for r in new] == [("bad", "done")]
    assert (out / "bad.mp4").is_file()
    log = result.stdout + result.stderr
    assert "cat (line 1): skipped" in log and "dog (line 3): skipped" in log


def test_two_replicas_share_the_jobs_and_match_one_process(batch, workdir):
    """deepspeed --num_gpus 2 --stages 1: two data-parallel replicas of one stage each."""
    _, single, _ = batch
    jobs_file = write_jobs(workdir / "jobs.jsonl", CAT, DOG)
    result = run_deepspeed(2, "--config", TINY_CONFIG, "--stages", 1, "--jobs", jobs_file, "--output-dir", "out",
                           cwd=workdir)
    assert result.returncode == 0, result.explain()
    out = workdir / "out"
    records = manifest(out)
    assert sorted((r["job"], r["status"], r["rank"]) for r in records) == [("cat", "done", 0), ("dog", "done", 1)]
    for latents in ("cat.safetensors", "latents/dog.safetensors"):
        assert torch.equal(load_file(out / latents)["latents"], load_file(single / latents)["latents"])
    log = result.stdout + result.stderr
    assert "replica 0/2" in log and "replica 1/2" in log
    assert "done: 2 job(s) on 2 replica(s)" in log


# ---- every place a run writes is checked before the model loads


def test_outputs_that_are_one_file_are_refused_case_insensitively_and_with_links(tmp_path, base):
    out = tmp_path / "out"
    (out / "real").mkdir(parents=True)
    (out / "alias").symlink_to(out / "real")
    jobs_file = write_jobs(tmp_path / "jobs.jsonl",
                           {"output": "a.mp4"}, {"output": "a.MP4"}, {"output": "real/b.mp4"},
                           {"output": "alias/b.mp4"}, {"output": "c.mp4", "save_latents": "c.mp4"},
                           {"name": "n", "output": "d.mp4"}, {"name": "N", "output": "e.mp4"})
    errors = [j.error for j in read_jobs(jobs_file, base, out)]
    assert errors == [
        None,
        "output: a.MP4 is also written by line 1",
        None,
        "output: alias/b.mp4 is also written by line 3",
        f"save_latents: {out / 'c.mp4'} is also this job's output",
        None,
        "name: 'N' is also the name of line 6",
    ]


def test_a_symbolic_link_out_of_the_output_dir_is_refused(tmp_path, base):
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (out / "link").symlink_to(tmp_path / "elsewhere")
    for key, path in (("output", "link/x.mp4"), ("save_latents", "link/x.safetensors")):
        job = parse({key: path}, base, out=out)
        assert job.error == f"{key}: {path!r} leads out of --output-dir through a symbolic link"


def test_temporary_names_and_the_manifest_are_not_outputs(base):
    assert parse({"output": ".a.partial.mp4"}, base).error.startswith(
        "output: '.a.partial.mp4' is named like a temporary file")
    assert parse({"save_latents": "sub/.x.mp4.k2j3.partial"}, base).error.startswith("save_latents: ")
    assert parse({"save_latents": "Manifest.JSONL"}, base).error == (
        "save_latents: 'Manifest.JSONL' is the manifest of --output-dir")


def test_bad_output_locations_fail_the_job_before_the_model_loads(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "file").write_text("x")
    (out / "frames").mkdir()
    jobs_file = write_jobs(tmp_path / "jobs.jsonl", {"name": "a", "output": "file/a.mp4"}, {"name": "b"},
                           {"name": "c", "save_latents": "file"})
    (tmp_path / "frames" / "b").mkdir(parents=True)
    (tmp_path / "frames" / "b" / "frame_000000.png").write_bytes(b"png")
    a, b, c = decide("--jobs", jobs_file, "--output-dir", out, "--save-frames", tmp_path / "frames")
    assert a.error == f"output: {out / 'file/a.mp4'} cannot be made: {out / 'file'} is not a folder"
    assert b.error == f"--save-frames: {tmp_path / 'frames/b'} already exists; pass --overwrite to replace it"
    assert c.error == f"save_latents: {out / 'file'} already exists; pass --overwrite to replace it"
    (out / "ro").mkdir()
    access = os.access  # a read-only folder (the tests run as root, for whom chmod changes nothing)
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != out / "ro" and access(path, mode))
    [job] = decide("--jobs", write_jobs(tmp_path / "one.jsonl", {"name": "d", "output": "ro/d.mp4"}), "--output-dir", out)
    assert job.error == f"output: {out / 'ro/d.mp4'} cannot be written: {out / 'ro'} is not writable"
    with pytest.raises(ConfigError, match=f"--output-dir: {out / 'ro'} cannot be written: {out / 'ro'} is not writable"):
        decide("--jobs", jobs_file, "--output-dir", out / "ro")


@pytest.mark.parametrize("make, error", [
    (lambda out: out.write_text("x"), "--output-dir: {out} is not a folder"),
    (lambda out: (out / MANIFEST).mkdir(parents=True), "--output-dir: {out}/manifest.jsonl is not a regular file"),
])
def test_an_output_dir_or_manifest_that_cannot_be_used_stops_the_run(tmp_path, make, error):
    out = tmp_path / "out"
    make(out)
    jobs_file = write_jobs(tmp_path / "jobs.jsonl", {"name": "a"})
    with pytest.raises(ConfigError, match=error.format(out=out)):
        decide("--jobs", jobs_file, "--output-dir", out)


def test_a_jobs_file_that_is_not_a_regular_file_is_refused(tmp_path, base):
    with pytest.raises(ConfigError, match="--jobs: /dev/zero is not a regular file"):
        read_jobs(Path("/dev/zero"), base, tmp_path)


def test_single_video_outputs_must_be_distinct_new_and_writable(tmp_path):
    (tmp_path / "frames").mkdir()
    (tmp_path / "frames" / "frame_000000.png").write_bytes(b"png")
    (tmp_path / "ck").write_text("a file")
    v = tmp_path / "v.mp4"
    cases = [
        (["--output", v, "--save-latents", tmp_path / "V.MP4"], f"--save-latents: {tmp_path / 'V.MP4'} is also the --output"),
        (["--output", v, "--save-frames", tmp_path / "frames"], f"--save-frames: {tmp_path / 'frames'} already exists"),
        (["--output", v, "--checkpoint-dir", tmp_path / "ck", "--checkpoint-every", 1],
         f"--checkpoint-dir: {tmp_path / 'ck'} is not a folder"),
        (["--output", str(tmp_path / "a\0.mp4")], "--output: '.*a\\\\x00.mp4' must not contain a NUL character"),
        (["--output", tmp_path / "ck" / "v.mp4"], f"--output: .* cannot be made: {tmp_path / 'ck'} is not a folder"),
    ]
    for argv, error in cases:
        with pytest.raises(ConfigError, match=error):
            decide(*argv)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "frames"]


def test_a_frames_folder_that_is_a_symbolic_link_is_refused_before_work(tmp_path):
    """`--save-frames DIR` gives each job DIR/<name>: a link there (out of DIR, or to another job's
    folder) is refused for that job up front, with or without --overwrite; the other jobs run."""
    out, frames, elsewhere = tmp_path / "out", tmp_path / "frames", tmp_path / "elsewhere"
    for folder in (out, frames, elsewhere):
        folder.mkdir()
    (frames / "a").symlink_to(elsewhere)  # an empty folder elsewhere: would not count as existing output
    (frames / "b").symlink_to(frames / "c")  # a link to another job's folder
    (frames / "dangling").symlink_to(tmp_path / "nowhere")
    jobs_file = write_jobs(tmp_path / "jobs.jsonl", {"name": "a"}, {"name": "b"}, {"name": "c"}, {"name": "dangling"})
    for extra in ((), ("--overwrite",)):
        a, b, c, dangling = decide("--jobs", jobs_file, "--output-dir", out, "--save-frames", frames, *extra)
        for job in (a, b, dangling):
            assert job.config is None
            assert job.error == (f"--save-frames: {frames / job.name} is a symbolic link; each job's frames "
                                 "folder is made inside --save-frames (remove the link)")
        assert c.error is None
    assert sorted(p.name for p in elsewhere.iterdir()) == []


def test_a_scheduler_that_cannot_take_the_steps_fails_the_job_before_work(tmp_path, monkeypatch):
    """A scheduler that fails at some step is found up front by running the job's on a one-value latent,
    so that job fails and the others run (on several stages, failing in the middle would end the run);
    a single video stops with one line. diffusers' UniPC failed at the last step from about 334 steps at
    flow_shift 3 (it looks its step up among timesteps that repeat); the engine's counts its steps."""
    from ds_dualparal.cli.checks import check_work
    from ds_dualparal.pipeline.unipc import UniPC
    from ds_dualparal.wan.model import WanConfig
    from ds_dualparal.wan.weights import TINY_WAN_PATH

    wan = WanConfig.from_json(TINY_WAN_PATH / "transformer" / "config.json")
    jobs_file = write_jobs(tmp_path / "jobs.jsonl", {"name": "many", "steps": 400}, {"name": "euler", "steps": 400,
                           "scheduler": "euler"}, {"name": "few"})
    argv = ["--jobs", jobs_file, "--output-dir", tmp_path / "out"]
    jobs = decide(*argv)
    check_work(args_of(*argv), jobs, wan, "cpu")
    assert all(job.error is None for job in jobs)  # 400 UniPC steps are fine

    def fails_at_the_last_step(self, *args, _step=UniPC.step, **kwargs):
        if self.steps_taken == len(self.timesteps) - 1 and len(self.timesteps) >= 334:
            raise AssertionError
        return _step(self, *args, **kwargs)

    monkeypatch.setattr(UniPC, "step", fails_at_the_last_step)
    jobs = decide(*argv)
    check_work(args_of(*argv), jobs, wan, "cpu")
    many, euler, few = jobs
    assert many.config is None and many.error == (
        "num_inference_steps/scheduler/flow_shift: the unipc scheduler fails at step 400 of 400 at flow_shift 3.0 "
        "(AssertionError); use fewer steps or another scheduler")
    assert euler.error is None and few.error is None
    argv = ["--output", tmp_path / "v.mp4", "--steps", 400]
    with pytest.raises(ConfigError, match="--steps/--scheduler/--flow-shift: the unipc scheduler fails at step 400"):
        check_work(args_of(*argv), decide(*argv), wan, "cpu")
