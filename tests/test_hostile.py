"""Hostile input (issue #25): each case ends before any work with one line naming the input, or is
made harmless; nothing a run writes may delete another of its outputs."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import RANDOM_TINY, TINY_CONFIG
from safetensors.torch import load_file, save_file

from ds_dualparal.cli.args import build_parser, check_args, config_from_args
from ds_dualparal.cli.checks import plan_jobs
from ds_dualparal.config import ConfigError, load_config
from ds_dualparal.files import holds, read_regular_file
from ds_dualparal.pipeline import comm
from ds_dualparal.wan.lora import LoraError, LoraFile


def decide(*argv):
    args = build_parser().parse_args(["--config", str(TINY_CONFIG), *map(str, argv)])
    cfg = config_from_args(args)
    check_args(args, cfg)
    return plan_jobs(args, cfg)


# ---- data loss: a frames folder that is or holds another output


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_a_frames_folder_holding_the_output_or_latents_is_refused_without_advising_overwrite(tmp_path, overwrite):
    folder = tmp_path / "O" / "D"
    folder.mkdir(parents=True)
    (folder / "earlier.mp4").write_bytes(b"kept")
    with pytest.raises(ConfigError, match="--save-frames: .*D would hold the --output .*new.mp4") as err:
        decide("--output", folder / "new.mp4", "--save-frames", folder, *overwrite)
    assert "pass --overwrite" not in str(err.value)
    with pytest.raises(ConfigError, match="would hold the --save-latents .*l.safetensors"):
        decide("--output", tmp_path / "A" / "v.mp4", "--save-latents", tmp_path / "A" / "F" / "l.safetensors",
               "--save-frames", tmp_path / "A" / "F", *overwrite)
    with pytest.raises(ConfigError, match="would hold the --checkpoint-dir"):
        decide("--output", tmp_path / "v.mp4", "--checkpoint-dir", tmp_path / "F" / "ck", "--checkpoint-every", 1, "--save-frames",
               tmp_path / "F", *overwrite)
    assert (folder / "earlier.mp4").read_bytes() == b"kept"
    # beside the outputs, not above them, it is fine
    assert decide("--output", folder / "new.mp4", "--save-frames", folder / "frames", *overwrite)[0].error is None


def test_a_jobs_frames_folder_holding_another_jobs_output_or_the_manifest_fails_that_job(tmp_path):
    out = tmp_path / "out"
    (out / "clips").mkdir(parents=True)
    jobs_file = tmp_path / "jobs.jsonl"
    jobs_file.write_text('{"name": "clips"}\n{"name": "x", "output": "clips/a.mp4"}\n{"name": "y"}\n')
    clips, x, y = decide("--jobs", jobs_file, "--output-dir", out, "--save-frames", out, "--overwrite")
    assert clips.config is None and "out/clips would hold line 2's output" in clips.error
    assert "--overwrite" not in clips.error
    assert x.error is None and y.error is None
    # --save-frames above --output-dir: a job named after the output folder would hold the manifest
    jobs_file.write_text('{"name": "out"}\n')
    [job] = decide("--jobs", jobs_file, "--output-dir", out, "--save-frames", tmp_path, "--overwrite")
    assert "would hold the manifest" in job.error


def test_holds_is_the_folder_itself_or_below_it(tmp_path):
    assert holds(tmp_path, tmp_path) and holds(tmp_path, tmp_path / "a" / "b")
    assert not holds(tmp_path / "a", tmp_path / "ab") and not holds(tmp_path / "a", tmp_path)


# ---- hangs: files that never end, a converter that never returns, DeepSpeed's CPU op build


@pytest.mark.parametrize("make", ["fifo", "device"])
def test_config_prompts_and_jobs_that_are_not_regular_files_are_refused_at_once(tmp_path, make):
    if make == "fifo":
        path = tmp_path / "fifo"
        os.mkfifo(path)
    else:
        path = Path("/dev/zero")
    started = time.monotonic()
    with pytest.raises(ConfigError, match="is not a regular file"):
        load_config(path)
    with pytest.raises(SystemExit) as err:
        build_parser().parse_args(["--prompts", str(path)])
    assert err.value.code == 2
    with pytest.raises(ConfigError, match="--jobs: .* is not a regular file"):
        decide("--jobs", path, "--output-dir", tmp_path / "out")
    assert time.monotonic() - started < 10


def test_read_regular_file_bounds_the_size(tmp_path):
    path = tmp_path / "big.json"
    path.write_bytes(b" " * 2049)
    assert read_regular_file(path, 4096) == b" " * 2049
    with pytest.raises(OSError, match="larger than"):
        read_regular_file(path, 2048)


def test_a_cpu_world_does_not_build_the_shared_memory_op():
    from deepspeed.comm.torch import build_shm_op

    with comm._without_shm_op(True):
        assert build_shm_op() is None  # would otherwise build with g++ or wait on its lock


def test_the_private_name_the_shared_memory_op_check_relies_on():
    """comm.py reaches DeepSpeed's op table by a private name (`deepspeed.ops.__compatible_ops__`, which
    `build_shm_op` reads before it builds): an upgrade that moves it fails here, not silently in a run."""
    import inspect

    import deepspeed.ops
    from deepspeed.comm.torch import build_shm_op

    assert isinstance(deepspeed.ops.__compatible_ops__, dict) and comm._SHM_OP in deepspeed.ops.__compatible_ops__
    assert "deepspeed.ops.__compatible_ops__.get(builder.NAME" in inspect.getsource(build_shm_op)


# ---- LoRA files that hung or raised


def write_wan_lora(path, alpha=None, rows=4, metadata=None):
    """One original-Wan LoRA target of the tiny model (width 24), with `alpha` as its `.alpha` tensor."""
    state = {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(rows, 24),
             "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(24, rows)}
    if alpha is not None:
        state["diffusion_model.blocks.0.self_attn.q.alpha"] = torch.tensor(alpha)
    save_file(state, path, metadata=metadata)
    return path


@pytest.mark.parametrize("alpha", [-1.0, 0.0, float("nan"), float("inf")])
def test_an_alpha_that_is_not_a_finite_number_above_zero_is_refused_before_the_converter(tmp_path, alpha):
    path = write_wan_lora(tmp_path / "l.safetensors", alpha)
    started = time.monotonic()
    with pytest.raises(LoraError, match=r"self_attn\.q\.alpha is .*; a LoRA's alpha must be a finite number above 0"):
        LoraFile(path)
    assert time.monotonic() - started < 10
    assert LoraFile(write_wan_lora(tmp_path / "ok.safetensors", 8.0)).tensors == 2


@pytest.mark.parametrize("meta, error", [
    ({"r": 10**400, "lora_alpha": 4}, "r must be a whole number"),
    ({"r": 4, "lora_alpha": float("inf")}, "lora_alpha must be a finite number"),
    ({"r": True, "lora_alpha": 4}, "r must be a whole number"),
])
def test_adapter_metadata_with_overflowing_or_odd_numbers_is_refused(tmp_path, meta, error):
    state = {"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 24),
             "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.zeros(24, 4)}
    path = tmp_path / "l.safetensors"
    save_file(state, path, metadata={"lora_adapter_metadata": json.dumps(meta)})
    with pytest.raises(LoraError, match=f"adapter metadata not supported .*{error}"):
        LoraFile(path)
    save_file(state, path, metadata={"lora_adapter_metadata": "[" * 100_000 + "]" * 100_000})
    with pytest.raises(LoraError, match="adapter metadata not supported"):
        LoraFile(path)


def test_a_rank_or_alpha_shape_beyond_reason_is_refused_before_allocating(tmp_path):
    with pytest.raises(LoraError, match=r"lora_down.weight: rank 1048577 is more than 1048576"):
        LoraFile(write_wan_lora(tmp_path / "rank.safetensors", 8.0, rows=2**20 + 1))
    path = tmp_path / "alpha.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 24),
               "diffusion_model.blocks.0.self_attn.q.alpha": torch.ones(3)}, path)
    with pytest.raises(LoraError, match=r"alpha has shape \[3\]; a LoRA's alpha is one number"):
        LoraFile(path)


def test_a_lora_file_whose_name_looks_like_a_scale_is_that_file(tmp_path, monkeypatch):
    from ds_dualparal.cli.args import parse_lora

    monkeypatch.chdir(tmp_path)
    assert parse_lora("b:0.5") == {"path": "b", "scale": 0.5}
    Path("b:0.5").write_bytes(b"")
    assert parse_lora("b:0.5") == {"path": "b:0.5"}


# ---- tracebacks found late: the rotary range, steps, names too long


def check(*argv):
    """plan_jobs then check_work on rank 0's side, with the embedded tiny model."""
    from ds_dualparal.cli.checks import check_model, check_work

    args = build_parser().parse_args(["--config", str(TINY_CONFIG), *map(str, argv)])
    cfg = config_from_args(args)
    check_args(args, cfg)
    jobs = plan_jobs(args, cfg)
    check_work(args, jobs, check_model(cfg), "cpu")
    return jobs


def test_windows_and_sizes_past_the_rotary_range_are_refused_up_front(tmp_path):
    with pytest.raises(ConfigError, match=r"^--width: width 100000 is 6250 rotary positions, past the model's 1024"):
        check("--output", tmp_path / "v.mp4", "--width", 100000, "--frames", 5)
    with pytest.raises(ConfigError, match=r"^--frames/--block-size/--context: a window of 1025 latent frames"):
        check("--output", tmp_path / "v.mp4", "--frames", 4097, "--block-size", 1_000_000, "--context", 0)
    jobs_file = tmp_path / "jobs.jsonl"
    jobs_file.write_text('{"name": "wide", "height": 32768}\n{"name": "ok", "frames": 5}\n')
    wide, ok = check("--jobs", jobs_file, "--output-dir", tmp_path / "out")
    assert wide.error.startswith("height: height 32768 is 2048 rotary positions") and ok.error is None
    # the longest that fits: one block of 1024 latent frames
    assert check("--output", tmp_path / "v.mp4", "--frames", 4093, "--block-size", 10**6, "--context", 0,
                 "--height", 16, "--width", 16)[0].error is None


def test_one_block_is_estimated_at_its_real_size():
    from ds_dualparal.pipeline.estimate import estimate
    from ds_dualparal.wan.model import WanConfig

    wan = WanConfig.from_json(RANDOM_TINY / "transformer" / "config.json")
    cfg = load_config(TINY_CONFIG).dualparal
    huge = estimate(cfg.with_overrides(block_size=1_000_000), wan)
    assert huge.blocks == 1 and huge.window_tokens == estimate(cfg.with_overrides(block_size=6, context=0), wan).window_tokens
    assert huge.cached_tokens == 0


def test_steps_are_bounded_before_any_scheduler_is_made(tmp_path):
    for steps in ("100000000", "1000000000000"):
        with pytest.raises(ConfigError, match=f"steps: {steps} must be <= 1000"):
            decide("--output", tmp_path / "v.mp4", "--steps", steps)


def test_an_output_name_too_long_for_the_file_system_fails_its_job_only(tmp_path):
    jobs_file = tmp_path / "jobs.jsonl"
    deep = "/".join(["b" * 200] * 30) + "/x.mp4"
    jobs_file.write_text(json.dumps({"name": "a" * 300}) + "\n" + json.dumps({"name": "deep", "output": deep})
                         + "\n" + '{"name": "ok"}\n')
    long_name, long_path, ok = decide("--jobs", jobs_file, "--output-dir", tmp_path / "out", "--save-frames",
                                      tmp_path / "frames")
    assert "has a name longer than 255 bytes" in long_name.error
    assert "is longer than the 4095 bytes a path may have" in long_path.error
    assert ok.error is None
    with pytest.raises(ConfigError, match="--output: .* is longer than the 4095 bytes"):
        decide("--output", tmp_path / deep)


# ---- signals: SIGTERM/SIGHUP as Ctrl-C, a bounded exit, ranks that outlive their launcher


def _python(code: str, *argv: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.Popen([sys.executable, "-c", code, *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_raise_like_ctrl_c_and_a_stuck_process_still_ends(signum):
    code = """if True:
        import signal, sys, time
        from ds_dualparal.cli import signals
        signals.install(grace_s=1.0)
        try:
            print("ready", flush=True)
            time.sleep(60)
        except signals.Terminated as err:
            print("raised", err, err.signum, isinstance(err, KeyboardInterrupt), flush=True)
        while True:  # a main thread that never comes back (as one blocked in a collective)
            try:
                time.sleep(60)
            except KeyboardInterrupt:
                pass
    """
    process = _python(code)
    try:
        assert process.stdout.readline() == "ready\n"
        process.send_signal(signum)
        assert process.stdout.readline() == f"raised {signum.name} {int(signum)} True\n"
        assert process.wait(timeout=30) == 128 + signum  # ended by the deadline, a second after the signal
    finally:
        process.kill()


def test_a_rank_ends_when_the_launcher_above_it_is_gone():
    """A fake `deepspeed` (the outer process) starts a fake per-node launcher (its command line names
    deepspeed.launcher.launch), which starts a 'rank'; SIGKILL to the outer process leaves the others
    orphaned, and the rank must end by itself."""
    rank = """if True:
        import time
        from ds_dualparal.cli import signals
        assert signals.launcher_pids() is not None
        signals.install(grace_s=1.0, watch_s=0.1)
        try:
            print("rank ready", flush=True)
            time.sleep(60)
        except signals.Terminated:
            print("rank terminated", flush=True)
    """
    launcher = """if True:
        import os, subprocess, sys, time
        rank = subprocess.Popen([sys.executable, "-c", sys.argv[1]])
        print(os.getpid(), rank.pid, flush=True)
        time.sleep(60)
    """
    outer = """if True:
        import subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2], "deepspeed.launcher.launch"])
        time.sleep(60)
    """
    process = _python(outer, launcher, rank)
    pids = []
    try:
        pids = [int(pid) for pid in process.stdout.readline().split()]
        rank_pid = pids[1]
        assert process.stdout.readline() == "rank ready\n"
        process.kill()
        process.wait()
        assert process.stdout.readline() == "rank terminated\n"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and _alive(rank_pid):
            time.sleep(0.1)
        assert not _alive(rank_pid)
    finally:
        process.kill()
        for pid in pids:  # the fake launcher stays an orphan: it is only a stand-in
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


def _generate_process(workdir, *argv, code=None):
    from conftest import GENERATE, subprocess_env

    command = [sys.executable, str(GENERATE), "--config", str(TINY_CONFIG), *map(str, argv)]
    if code is not None:
        command = [sys.executable, "-c", code, *map(str, argv)]
    return subprocess.Popen(command, cwd=workdir, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)


def test_sigterm_to_a_plain_run_is_one_line_and_leaves_no_temporary(workdir):
    process = _generate_process(workdir, "--frames", "321", "--output", "v.mp4")
    text = bytearray()
    try:
        while chunk := process.stdout.read1(4096):
            text.extend(chunk)
            if re.search(rb"\| +[1-9][0-9]*/[0-9]+ \[[^]\r\n]*block-step", bytes(text)):
                break
        process.send_signal(signal.SIGTERM)  # to the process only, as `kill` and `timeout` send it
        text.extend(process.stdout.read())
        assert process.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        process.kill()
    said = [line for line in text.decode(errors="replace").splitlines() if line.startswith("generate.py:")]
    assert said == ["generate.py: error: interrupted (SIGTERM); unfinished outputs were removed"]
    assert b"Traceback" not in text
    assert list(workdir.iterdir()) == []  # neither the mp4 nor its temporary


def test_ctrl_c_after_the_summary_keeps_the_exit_code_of_the_complete_run(workdir):
    code = """if True:
        import sys
        from ds_dualparal.pipeline import comm
        shutdown = comm.shutdown

        def interrupted_once():
            comm.shutdown = shutdown
            raise KeyboardInterrupt
        comm.shutdown = interrupted_once
        from ds_dualparal.cli.main import main
        sys.exit(main(sys.argv[1:]))
    """
    process = _generate_process(workdir, "--config", TINY_CONFIG, "--frames", "5", "--steps", "2", "--output",
                                "v.mp4", code=code)
    text = process.communicate(timeout=300)[0].decode(errors="replace")
    assert process.returncode == 0, text[-3000:]
    assert "interrupted (Ctrl-C) after the summary; every output is complete" in text
    assert (workdir / "v.mp4").stat().st_size > 0
    assert "built successfully" not in text  # a CPU world does not build DeepSpeed's shm op


# ---- checkpoints: edited scheduler state, deep manifests, links


def _rehash(checkpoint: Path) -> None:
    """What an editor who knows the format does: the manifest's sizes and hashes made to match again."""
    from ds_dualparal.output.checkpoint import MANIFEST, _digest

    manifest = json.loads((checkpoint / MANIFEST).read_text())
    manifest["files"] = {name: _digest(checkpoint / name) for name in manifest["files"]}
    (checkpoint / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("edit, error", [
    (lambda s: s.update(steps_taken="x"), "steps_taken is 'x', expected 3"),
    (lambda s: s.update(steps_taken=10**30), "steps_taken is 1000000000000000000000000000000"),
    (lambda s: s.update(model_outputs=[900, 750]), r"model_outputs \[0\] is int, expected a tensor"),
    (lambda s: s.pop("last_sample"), "scheduler has .*, expected"),
    (lambda s: s.update(model_outputs=s["model_outputs"][:1]), "model_outputs is not a list of 2"),
])
def test_an_edited_scheduler_state_is_refused_field_by_field_before_work(tmp_path, edit, error):
    from test_checkpoint import TINY_WAN_PATH, saved_run

    from ds_dualparal.output.checkpoint import STATE, Checkpoints, ResumeError

    cfg = load_config(TINY_CONFIG).dualparal
    folder, tl = saved_run(tmp_path, cfg)
    newest = folder.path(4)
    state = json.loads((newest / STATE).read_text())
    edit(state["schedulers"]["1"])
    (newest / STATE).write_text(json.dumps(state))
    _rehash(newest)
    with pytest.raises(ResumeError, match=f"iter_000004 is damaged \\(state.json: block 1's .*{error}"):
        Checkpoints.open(folder.folder, 1, cfg, TINY_WAN_PATH, tl.num_iterations)


def test_a_deep_manifest_and_linked_checkpoints_are_refused(tmp_path):
    from test_checkpoint import TINY_WAN_PATH, saved_run

    from ds_dualparal.output.checkpoint import MANIFEST, Checkpoints, ResumeError

    cfg = load_config(TINY_CONFIG).dualparal
    folder, tl = saved_run(tmp_path, cfg)
    (folder.path(4) / MANIFEST).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ResumeError, match="iter_000004 is damaged \\(its manifest is nested too deeply\\)"):
        Checkpoints.open(folder.folder, 1, cfg, TINY_WAN_PATH, tl.num_iterations)
    elsewhere = tmp_path / "elsewhere"
    folder.path(4).rename(elsewhere)
    folder.path(4).symlink_to(elsewhere)
    with pytest.raises(ResumeError, match="iter_000004 is a symbolic link, not a checkpoint this program wrote"):
        Checkpoints.open(folder.folder, 1, cfg, TINY_WAN_PATH, tl.num_iterations)
    link = tmp_path / "link"
    link.symlink_to(folder.folder)
    with pytest.raises(ResumeError, match="link is a symbolic link; give the folder itself"):
        Checkpoints.open(link, 1, cfg, TINY_WAN_PATH, tl.num_iterations)


# ---- the scripts in launch/ (their argument checks, in process)


def _script(name: str):
    from conftest import launch_script

    return launch_script(name)


def _refused(parse, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        parse(argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_quality_needs_overwrite_to_replace_its_out(tmp_path, capsys):
    out = tmp_path / "q.json"
    out.write_text("{}")
    line = _refused(_script("quality.py").parse_args, ["--out", str(out)], capsys)
    assert f"--out {out} already exists; pass --overwrite" in line
    assert out.read_text() == "{}"


@pytest.mark.parametrize("argv, error", [
    (["--device", "foo"], "--device 'foo' is not a device"),
    (["--device", "cuda"], "CUDA is not available"),
    (["--seed", str(2**64)], "--seed must be in [0, 4294967296)"),
    (["--vae-from", "missing"], "--vae-from missing holds no vae/config.json"),
    (["--max-minutes", "0"], "--max-minutes must be a number of minutes above 0, got 0.0"),
    (["--out", "file/model"], "--out file/model cannot be made: file is not a folder"),
])
def test_train_tiny_refuses_what_would_fail_after_training(tmp_path, monkeypatch, capsys, argv, error):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("")
    argv = ["--out", "model", *argv] if "--out" not in argv else argv
    assert error in _refused(_script("train_tiny.py").parse_args, ["--smoke", *argv], capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


# ---- non-finite values: refused where they come from, and blamed on what can cause them


def test_non_finite_latents_name_the_lora_when_there_is_one():
    from ds_dualparal.cli.runner import JobFailed, check_finite

    bad = torch.tensor([float("nan")])
    cfg = load_config(TINY_CONFIG).dualparal
    with pytest.raises(JobFailed, match=r"\(look at an extreme --guidance or --flow-shift\)$"):
        check_finite(0, bad, cfg)
    with pytest.raises(JobFailed, match="--flow-shift or the LoRA's scale or values"):
        check_finite(0, bad, cfg.with_overrides(loras=[{"path": "l.safetensors"}]))


def test_a_lora_tensor_that_is_not_finite_is_refused_as_its_layer_loads(tmp_path):
    from ds_dualparal.wan.lora import with_loras
    from ds_dualparal.wan.model import WanConfig, layer_specs
    from ds_dualparal.wan.weights import FolderWeights

    wan = WanConfig.from_json(RANDOM_TINY / "transformer" / "config.json")
    path = tmp_path / "nan.safetensors"
    save_file({"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.full((4, wan.inner_dim), float("nan")),
               "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.zeros(wan.inner_dim, 4)}, path)
    cfg = load_config(None, {"loras": [{"path": str(path)}]}).dualparal
    [source] = with_loras([FolderWeights(RANDOM_TINY / "transformer", torch.float32, "cpu")], [wan], cfg.loras)
    with pytest.raises(LoraError, match="lora_A.weight holds values that are not finite"):
        for spec in layer_specs(wan, source):
            spec.build()


def test_a_checkpoint_with_non_finite_latents_is_refused_before_work(tmp_path):
    from test_checkpoint import TINY_WAN_PATH, saved_run

    from ds_dualparal.output.checkpoint import LATENTS, Checkpoints, ResumeError

    cfg = load_config(TINY_CONFIG).dualparal
    folder, tl = saved_run(tmp_path, cfg)
    latents = load_file(folder.path(4) / LATENTS)
    latents["block_0000"][0, 0, 0, 0, 0] = float("inf")
    save_file(latents, folder.path(4) / LATENTS)
    _rehash(folder.path(4))
    with pytest.raises(ResumeError, match="its latents hold values that are not finite"):
        Checkpoints.open(folder.folder, 1, cfg, TINY_WAN_PATH, tl.num_iterations)


@pytest.mark.parametrize("argv, error", [
    (["--frames", "10000000"], "block-steps to simulate, more than 200000"),
    (["--block-step-seconds", "inf"], "must be a finite number > 0, got inf"),
    (["--send-seconds", "nan"], "must be a finite number >= 0, got nan"),
])
def test_the_planner_bounds_its_inputs(argv, error, capsys):
    from ds_dualparal.pipeline import planner

    base = {"--stages": "2", "--frames": "48", "--block-size": "8", "--context": "8", "--steps": "10",
            "--block-step-seconds": "1"}
    base.update(dict(zip(argv[::2], argv[1::2])))
    started = time.monotonic()
    assert error in _refused(planner.main, [x for pair in base.items() for x in pair], capsys)
    assert time.monotonic() - started < 10


def test_first_stage_vae_layers_beyond_the_model_is_refused(tmp_path):
    from ds_dualparal.cli.checks import check_model

    cfg = load_config(TINY_CONFIG, {"first_stage_vae_layers": 1e308}).dualparal
    with pytest.raises(ConfigError, match="first_stage_vae_layers: 1e\\+308 is more than the model's"):
        check_model(cfg)


def test_a_stopped_rank_ends_the_run_near_one_comm_timeout(workdir):
    """Rank 1 SIGSTOPs itself: rank 0 times out after comm_timeout_s, wakes rank 1 as it leaves, and the
    launcher's SIGTERM then ends rank 1 at once instead of after its 30 s grace and SIGKILL."""
    from test_faults import assert_ended, launch_with_timeout

    timeout_s = 10
    run = launch_with_timeout(workdir, "rank=1,tick=3,action=stop", timeout_s)
    assert_ended(run, workdir, at_least_s=timeout_s)
    assert run.seconds_after_fault < timeout_s + 15, (run.seconds_after_fault, run.log[-4000:])
