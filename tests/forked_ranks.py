"""Ranks of `launch/generate.py` (and runs of `launch/train_tiny.py`) forked from a process that has
already imported the runtime.

A fresh Python process spends seconds importing torch, DeepSpeed, diffusers and transformers before it
does anything (about 6.5 s on the 2-core test machine, more under load), and DeepSpeed's launcher pays
it twice more for itself; most tests that generate paid it for every rank. Here multiprocessing's
forkserver imports this module once per test session, and every rank is a fork of that process: it
sets the environment DeepSpeed's launcher gives a rank (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_SIZE,
MASTER_ADDR, MASTER_PORT), moves to the run's folder and runs the script as `python SCRIPT ARGS` would
(`runpy`, as `__main__`), so the code under test is the same from the script's first line on. `conftest.run_deepspeed` plays the launcher: every
rank writes to the same stdout and stderr, and when one rank fails the others get SIGTERM (SIGKILL
after a grace), as `deepspeed.launcher.launch` does.

The forkserver only imports: it never computes, so no thread pool or process group exists to be
inherited by a fork. The launcher itself stays under test where the launcher is the point
(tests/test_faults.py, test_multinode.py, test_hostile.py).
"""

from __future__ import annotations

import importlib
import os
import sys

# What a generation imports, so that no rank imports it again (ranks import the rest lazily, as usual).
PRELOAD = (
    "torch",
    "torch.distributed",
    "deepspeed",
    "deepspeed.pipe",
    "deepspeed.ops.op_builder.all_ops",
    "diffusers",
    "diffusers.pipelines.wan.pipeline_wan",
    "diffusers.pipelines.wan.pipeline_wan_i2v",
    "transformers.models.umt5.modeling_umt5",
    "transformers.models.clip.modeling_clip",
    "ftfy",
    "imageio_ffmpeg",
    "safetensors.torch",
    "ds_dualparal.cli.main",
    "ds_dualparal.cli.runner",
    "ds_dualparal.output.checkpoint",
    "ds_dualparal.output.stream",
    "ds_dualparal.output.video",
    "ds_dualparal.pipeline.generation",
    "ds_dualparal.pipeline.engine",
    "ds_dualparal.pipeline.clip",
    "ds_dualparal.pipeline.image",
    "ds_dualparal.wan.lora",
    "ds_dualparal.wan.text",
    "ds_dualparal.toy.tiny",
    "ds_dualparal.toy.toyvideo",
    "diffusers.models.autoencoders.autoencoder_kl_wan",
)

for _name in PRELOAD:
    importlib.import_module(_name)
_IMPORTED_BY = os.getpid()


def run_script(script: str, argv: list[str], cwd: str, env: dict[str, str], stdout: str, stderr: str) -> None:
    """`python SCRIPT ARGV` in `cwd` with exactly `env`, writing to the two files; its exit code is the process's."""
    import runpy

    import torch

    if _IMPORTED_BY == os.getpid():  # a process that paid for the imports itself: the preload failed
        raise RuntimeError("forked_ranks was not preloaded by the forkserver (is tests/ on its sys.path?)")
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, stdout), (2, stderr)):
        file = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(file, fd)
        os.close(file)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))
    sys.argv = [script, *argv]
    sys.path.insert(0, os.path.dirname(script))  # as `python SCRIPT` puts the script's folder first
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
