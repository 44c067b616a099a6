"""A rank that raises, is killed or hangs ends the whole 2-rank run: soon after the fault, with a
non-zero exit code, a log that names the rank and the error, and no output at its final name
(nor DeepSpeed's shared-memory buffers in /dev/shm, which outlive killed processes).

Faults come from the engine's test hook, DS_DUALPARAL_FAULT="rank=R,tick=T,action=..."; the time is
measured from the line the faulty rank logs, so a slow start on a busy machine does not count: the
start-up (launch to fault) is measured in the same run and reported apart.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

import pytest
from conftest import GENERATE, TINY_CONFIG, deepspeed_command, run_deepspeed, subprocess_env

BOUND_S = 60  # from the fault to the launcher's exit
OUTPUTS = ("video.mp4", "latents.safetensors")


class Ended(NamedTuple):
    returncode: int
    log: str
    seconds_after_fault: float
    port: str
    startup_s: float  # from the launch to the fault


def launch_with_fault(cwd, fault: str, *args, timeout: float = 300) -> Ended:
    """Runs 2 ranks under DeepSpeed's launcher with DS_DUALPARAL_FAULT=`fault`, timing from the fault."""
    command = deepspeed_command(2, "--config", *args, "--output", "video.mp4", "--save-latents", OUTPUTS[1])
    port = command[command.index("--master_port") + 1]
    launched = time.monotonic()
    process = subprocess.Popen(command, cwd=cwd, env=subprocess_env({"DS_DUALPARAL_FAULT": fault}),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines, fault_at = [], []

    def read():
        for line in process.stdout:
            if "DS_DUALPARAL_FAULT: " in line and not fault_at:
                fault_at.append(time.monotonic())
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the launcher and its ranks: this test's own session
        process.wait()
        pytest.fail("the run did not end:\n" + "".join(lines[-40:]))
    ended = time.monotonic()
    reader.join(timeout=10)
    log = "".join(lines)
    assert fault_at, "the fault never fired:\n" + log[-4000:]
    return Ended(process.returncode, log, ended - fault_at[0], port, fault_at[0] - launched)


def launch_with_timeout(cwd, fault: str, timeout_s: float) -> Ended:
    """`launch_with_fault` on the tiny config with `comm_timeout_s` set to `timeout_s`."""
    config = json.loads(TINY_CONFIG.read_text())
    config["dualparal"]["comm_timeout_s"] = timeout_s
    config_file = cwd.parent / "timeout.json"
    config_file.write_text(json.dumps(config))
    return launch_with_fault(cwd, fault, config_file)


def assert_ended(run: Ended, cwd, *, at_least_s: float = 0.0):
    assert run.returncode != 0, run.log[-4000:]
    assert at_least_s <= run.seconds_after_fault < BOUND_S, (run.seconds_after_fault, run.log[-4000:])
    for name in OUTPUTS:
        assert not (cwd / name).exists()
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{run.port}_*"))


def test_a_rank_that_raises_ends_the_run(workdir):
    run = launch_with_fault(workdir, "rank=1,tick=3", TINY_CONFIG)
    assert_ended(run, workdir)
    raised = "rank 1 failed: RuntimeError: fault injected by DS_DUALPARAL_FAULT at tick 3"
    assert f"[rank 1] CRITICAL ds_dualparal: {raised}" in run.log
    assert "rank 0 failed: CommError: rank 0: transfer with rank(s) [1] failed" in run.log


def test_a_killed_rank_ends_the_run(workdir):
    run = launch_with_fault(workdir, "rank=1,tick=3,action=kill", TINY_CONFIG)
    assert_ended(run, workdir)
    assert "[rank 1] WARNING ds_dualparal.pipeline.engine: DS_DUALPARAL_FAULT: kill at tick 3" in run.log
    assert "rank 0 failed: CommError: rank 0: transfer with rank(s) [1] failed" in run.log


TIMEOUT_S = 10


def test_a_hung_rank_ends_the_run_after_about_one_comm_timeout_s(workdir):
    """Rank 1 stops responding; rank 0's transfer times out after the config's comm_timeout_s (not
    torch's 30-minute default for new groups), rank 0 names rank 1 and exits at once (no collective
    shutdown, no waiting destructors), and the launcher then stops rank 1: the whole run ends within
    1.5 x comm_timeout_s of the fault, i.e. within start-up + 1.5 x comm_timeout_s."""
    run = launch_with_timeout(workdir, "rank=1,tick=3,action=hang", TIMEOUT_S)
    assert_ended(run, workdir, at_least_s=TIMEOUT_S)
    assert run.seconds_after_fault < 1.5 * TIMEOUT_S, (run.startup_s, run.seconds_after_fault, run.log[-4000:])
    assert "rank 0 failed: CommError: rank 0: transfer with rank(s) [1] failed" in run.log
    assert "Timed out" in run.log


def test_the_fault_hook_reads_only_its_own_rank_and_refuses_what_it_cannot_read(monkeypatch):
    from ds_dualparal.pipeline.engine import InjectedFault

    monkeypatch.setenv("DS_DUALPARAL_FAULT", "rank=1,tick=3,action=kill")
    assert InjectedFault.from_environment(0) is None
    assert InjectedFault.from_environment(1) == InjectedFault(3, "kill")
    for spec in ("rank=1", "rank=1,tick=3,action=explode", "tick=3,rank=1"):
        monkeypatch.setenv("DS_DUALPARAL_FAULT", spec)
        with pytest.raises(ValueError, match="expected rank=R,tick=T"):
            InjectedFault.from_environment(1)
    monkeypatch.delenv("DS_DUALPARAL_FAULT")
    assert InjectedFault.from_environment(1) is None


def test_a_job_that_cannot_run_on_this_model_fails_alone_on_two_stages(workdir):
    """A per-job setting that would fail in the middle of the generation (a height past the model's
    rotary range: the stages' RoPE tables would be indexed out of range) would end a run of several
    stages, whose others wait in lockstep; it is found before the job starts, recorded as failed, and the
    next job runs."""
    (workdir / "jobs.jsonl").write_text(json.dumps({"name": "wide", "height": 32768}) + "\n"
                                        + json.dumps({"name": "ok", "steps": 2}) + "\n")
    result = run_deepspeed(2, "--config", TINY_CONFIG, "--jobs", "jobs.jsonl", "--output-dir", "out", cwd=workdir)
    log = result.stdout + result.stderr
    assert result.returncode == 1, log[-4000:]
    entries = [json.loads(line) for line in (workdir / "out" / "manifest.jsonl").read_text().splitlines()]
    assert [(e["job"], e["status"]) for e in entries] == [("wide", "failed"), ("ok", "done")]
    assert entries[0]["error"].startswith("height: height 32768 is 2048 rotary positions")
    assert sorted(p.name for p in (workdir / "out").iterdir()) == ["manifest.jsonl", "ok.mp4"]


def test_ctrl_c_is_one_line_and_leaves_nothing(workdir):
    """SIGINT to the process group (what a terminal's Ctrl-C does: ffmpeg gets it too), sent once the
    progress bar has moved: exit 130, one line, no traceback, no output and no temporary left."""
    command = [sys.executable, str(GENERATE), "--config", str(TINY_CONFIG), "--frames", "321", "--output", "v.mp4",
               "--save-latents", "l.safetensors", "--save-frames", "frames"]
    process = subprocess.Popen(command, cwd=workdir, env=subprocess_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, start_new_session=True)
    stderr, moved = bytearray(), threading.Event()

    def read():
        while chunk := process.stderr.read1(4096):
            stderr.extend(chunk)
            # the generation's own bar (unit block-step), not a loading bar of the text encoder
            if re.search(rb"\| +[1-9][0-9]*/[0-9]+ \[[^]\r\n]*block-step", bytes(stderr)):
                moved.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert moved.wait(240), "no progress:\n" + stderr.decode(errors="replace")[-3000:]
        os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    reader.join(timeout=10)
    text = stderr.decode(errors="replace").replace("\r", "\n")
    assert process.returncode == 130, text[-3000:]
    said = [line for line in text.splitlines() if line.startswith("generate.py:")]
    assert said == ["generate.py: error: interrupted (Ctrl-C); unfinished outputs were removed"], text[-3000:]
    assert "Traceback" not in text and "terminate called" not in text, text[-3000:]
    assert sorted(p.name for p in workdir.rglob("*")) == []
