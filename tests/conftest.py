"""Shared test helpers: one torch thread, and `launch/generate.py` run as users run it.

`run_main` runs `launch/generate.py`'s main in this process, for runs refused before the process group
starts (the cheap way to test a mistake); `run_generate` starts one plain process, `run_deepspeed`
the same script under DeepSpeed's launcher
(`python -m deepspeed.launcher.runner`, since the `deepspeed` script may not be on PATH), each with
a fresh master port. All three return `Run(returncode, stdout, stderr)` and work in a `tmp_path` folder,
so outputs never land in the repository.
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
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from ds_dualparal.files import free_port  # noqa: F401  (tests import it from here)
from ds_dualparal.toy.tiny import write_tiny_wan

ROOT = Path(__file__).resolve().parents[1]
GENERATE = ROOT / "launch" / "generate.py"
TINY_CONFIG = ROOT / "ds_configs" / "tiny.json"


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
    """`python launch/generate.py ARGS` in `cwd`, with `env` added to the environment."""
    return run([sys.executable, str(GENERATE), *map(str, args)], cwd, timeout, env)


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


def deepspeed_command(num_ranks: int, *args, script: Path = GENERATE) -> list[str]:
    return [
        sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_ranks),
        "--master_port", str(free_port()), str(script), *map(str, args),
    ]


def run_deepspeed(num_ranks: int, *args, cwd: Path, timeout: float = 300, env: dict[str, str] | None = None) -> Run:
    """`deepspeed --num_gpus N launch/generate.py ARGS` in `cwd` (CPU ranks on gloo when there is no GPU).

    One rank runs as a plain process: the same one-rank process group, without the launcher's start-up.
    """
    if num_ranks == 1:
        return run_generate(*args, cwd=cwd, timeout=timeout, env=env)
    return run(deepspeed_command(num_ranks, *args), cwd, timeout, env)


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
