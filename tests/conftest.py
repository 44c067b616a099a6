"""Shared test helpers: one torch thread, and `launch/generate.py` run as users run it.

`run_main` runs `launch/generate.py`'s main in this process, for runs refused before the process group
starts (the cheap way to test a mistake); `run_generate` runs it as one process and `run_deepspeed` as
N ranks, both forked from a forkserver that has the runtime imported (forked_ranks.py), each run with a
fresh master port. All return `Run(returncode, stdout, stderr)` and work in a `tmp_path` folder, so
outputs never land in the repository. `deepspeed_command` is the real launcher's command line, for the
tests where the launcher is the point.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from ds_dualparal.files import free_port
from ds_dualparal.toy.tiny import write_tiny_wan

ROOT = Path(__file__).resolve().parents[1]
GENERATE = ROOT / "launch" / "generate.py"
# The README demo (ds_configs/tiny.json) as it was before its steps and guidance were set for the trained
# model's looks (10 steps, guidance 3): 4 steps and guidance 5. The suite tests the engine, not the
# picture, and its iteration counts and times are this config's.
TINY_CONFIG = ROOT / "tests" / "tiny-fast.json"


def _random_tiny() -> Path:
    """The random-weight tiny Wan (3 blocks of width 24) that `write_tiny_wan(seed=0)` writes, once per
    session: the model tests that depend on its shapes and rounding use (LoRA files made for it, shard
    names, fp32 agreement with WanPipeline); the embedded default is the trained one."""
    folder = Path(tempfile.mkdtemp(prefix="ds-dualparal-random-tiny-"))
    atexit.register(shutil.rmtree, folder, True)
    return write_tiny_wan(folder / "tiny-wan", seed=0)


RANDOM_TINY = _random_tiny()


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    # The tiny models are so small that thread hand-offs cost more than the work on a busy 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Run(NamedTuple):
    returncode: int
    stdout: str
    stderr: str

    def explain(self) -> str:
        """The end of both streams, for assertion messages."""
        return f"exit {self.returncode}\n--- stdout\n{self.stdout[-3000:]}\n--- stderr\n{self.stderr[-3000:]}"


def subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The test's environment with one thread per rank (ranks share the machine's few cores), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra or {})
    return env


def run(command: list[str], cwd: Path, timeout: float, env: dict[str, str] | None = None) -> Run:
    result = subprocess.run(command, cwd=cwd, env=subprocess_env(env), capture_output=True, text=True, timeout=timeout)
    return Run(result.returncode, result.stdout, result.stderr)


def run_generate(*args, cwd: Path, timeout: float = 180, env: dict[str, str] | None = None) -> Run:
    """`python launch/generate.py ARGS` in `cwd`, with `env` added to the environment: one process forked
    from the session's forkserver (forked_ranks.py), the same one-rank process group."""
    return run_forked(GENERATE, 1, args, cwd, timeout, env)


def run_main(*args, cwd: Path) -> Run:
    """`launch/generate.py ARGS` in this process, for runs that end in a pre-flight refusal: the exit
    code and what it printed (log records stay with pytest). It must not start the process group
    (that is global to the process): a plain process finds every such mistake before it."""
    from ds_dualparal.cli.main import main
    from ds_dualparal.pipeline import comm

    out, err = io.StringIO(), io.StringIO()
    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # main installs its own handlers
    previous = os.getcwd(), [signal.getsignal(s) for s in handled], sys.unraisablehook
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as exit:  # argparse: --help, or a flag it cannot parse
                code = exit.code
    finally:
        os.chdir(previous[0])
        for signum, handler in zip(handled, previous[1]):
            signal.signal(signum, handler)
        sys.unraisablehook = previous[2]
    assert not comm.is_started(), "run_main started the process group: use run_generate for real runs"
    return Run(code, out.getvalue(), err.getvalue())


def launch_script(name: str):
    """`launch/NAME` as a module, loaded once per session under the name `launch_<stem>` (apart from the
    package's modules) and registered in sys.modules first: the scripts' dataclasses look their module up."""
    import importlib.util

    module_name = "launch_" + Path(name).stem
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, ROOT / "launch" / name)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def deepspeed_command(num_ranks: int, *args, script: Path = GENERATE) -> list[str]:
    return [
        sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_ranks),
        "--master_port", str(free_port()), str(script), *map(str, args),
    ]


def run_deepspeed(num_ranks: int, *args, cwd: Path, timeout: float = 300, env: dict[str, str] | None = None) -> Run:
    """`deepspeed --num_gpus N launch/generate.py ARGS` in `cwd` (CPU ranks on gloo when there is no GPU):
    N ranks forked from the session's forkserver with the environment the launcher gives them, and the
    launcher's rule that the first rank to fail ends the others (forked_ranks.py says why)."""
    return run_forked(GENERATE, num_ranks, args, cwd, timeout, env)


_FORKSERVER = None
KILL_GRACE_S = 30.0  # deepspeed.launcher.launch's grace between SIGTERM and SIGKILL


def _forkserver():
    global _FORKSERVER
    if _FORKSERVER is None:
        import multiprocessing
        from multiprocessing import forkserver

        _FORKSERVER = multiprocessing.get_context("forkserver")
        _FORKSERVER.set_forkserver_preload(["forked_ranks"])
        # The forkserver imports its preload from its own sys.path (Python 3.11 does not pass ours on).
        previous = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "tests"), previous]))
        try:
            forkserver.ensure_running()
        finally:
            if previous is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = previous
    return _FORKSERVER


def run_forked(script: Path, num_ranks: int, args, cwd: Path, timeout: float, env: dict[str, str] | None = None) -> Run:
    """`python SCRIPT ARGS` as `num_ranks` ranks forked from the session's forkserver (forked_ranks.py)."""
    import forked_ranks

    context = _forkserver()
    streams = Path(tempfile.mkdtemp(prefix="ds-dualparal-ranks-"))
    out, err = streams / "stdout", streams / "stderr"
    port = str(free_port())
    ranks = []
    for rank in range(num_ranks):
        rank_env = subprocess_env({
            "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(num_ranks), "LOCAL_SIZE": str(num_ranks),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, **(env or {}),
        }) if num_ranks > 1 else subprocess_env(env)
        process = context.Process(target=forked_ranks.run_script,
                                  args=(str(script), [str(a) for a in args], str(cwd), rank_env, str(out), str(err)))
        process.start()
        ranks.append(process)
    deadline = time.monotonic() + timeout
    failed = None
    try:
        while any(p.exitcode is None for p in ranks):
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"{num_ranks} forked rank(s) of {script.name} {args}", timeout)
            failed = next((p for p in ranks if p.exitcode not in (None, 0)), None)
            if failed is not None:  # the launcher's rule: one rank fails, the others are ended
                _end(ranks)
                break
            time.sleep(0.05)
    finally:
        _end(ranks)
    code = failed.exitcode if failed is not None else next((p.exitcode for p in ranks if p.exitcode), 0)
    result = Run(code, out.read_text() if out.exists() else "",
                 err.read_text() if err.exists() else "")
    shutil.rmtree(streams, ignore_errors=True)
    return result


def _end(ranks) -> None:
    alive = [p for p in ranks if p.exitcode is None]
    for p in alive:
        p.terminate()
    deadline = time.monotonic() + KILL_GRACE_S
    for p in alive:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.exitcode is None:
            p.kill()
            p.join()


@pytest.fixture
def workdir(tmp_path) -> Path:
    """An empty folder to run generate.py in."""
    path = tmp_path / "work"
    path.mkdir()
    return path


@pytest.fixture(scope="session")
def tiny_single_run(tmp_path_factory):
    """The README's main command on the tiny config, once per session: mp4, latents and PNG frames."""
    cwd = tmp_path_factory.mktemp("tiny_single_run")
    result = run_generate(
        "--config", TINY_CONFIG, "--output", "tiny.mp4", "--save-latents", "tiny.safetensors",
        "--save-frames", "frames", cwd=cwd,
    )
    assert result.returncode == 0, result.explain()
    return cwd, result
