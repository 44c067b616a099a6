"""`launch/generate.py`: one entry for a plain process, `deepspeed --num_gpus N` and `--hostfile` runs.

Flags override the config file. Every mistake a user can make (flag, config field, jobs line,
model folder, existing output) ends the run with one line naming it and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from .config import ConfigError, load_config
from .jobs import Job, done_outputs, read_jobs, record

log = logging.getLogger("ds_dualparal")

# flag -> config field
FLAGS = {
    "model": ("model", str, "local diffusers folder or hub id (default: the embedded tiny checkpoint)"),
    "prompt": ("prompt", str, "text prompt"),
    "negative_prompt": ("negative_prompt", str, "negative prompt for classifier-free guidance"),
    "frames": ("num_frames", int, "video frames, 4k+1"),
    "height": ("height", int, "height in pixels, a multiple of 16"),
    "width": ("width", int, "width in pixels, a multiple of 16"),
    "steps": ("num_inference_steps", int, "denoising steps per block"),
    "guidance": ("guidance_scale", float, "classifier-free guidance scale (CFG on when > 1)"),
    "block_size": ("block_size", int, "latent frames per block (B)"),
    "context": ("context", int, "context frames taken from the previous block (c, 0..B)"),
    "seed": ("seed", int, "noise seed"),
    "dtype": ("dtype", str, "float32, bfloat16 or float16"),
    "scheduler": ("scheduler", str, "unipc or euler"),
    "flow_shift": ("flow_shift", float, "flow-matching shift"),
    "noise": ("noise", str, "coordinated or independent initial noise"),
    "stages": ("pipeline_stages", int, "pipeline stages per replica (default: all ranks)"),
    "attention_backend": ("attention_backend", str, "diffusers attention backend, e.g. _native_cudnn"),
    "output": ("output", str, "output mp4 (single video)"),
    "save_latents": ("save_latents", str, "also save the final latents as safetensors (key 'latents')"),
    "fps": ("fps", int, "frames per second of the mp4"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, as for every other bad input
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="generate.py",
        description="Generate long videos with Wan by DualParal, pipelined over DeepSpeed ranks.",
    )
    parser.add_argument("--config", help="ds_config JSON with a 'dualparal' section (default: built-in defaults)")
    for flag, (_, kind, text) in FLAGS.items():
        parser.add_argument("--" + flag.replace("_", "-"), dest=flag, type=kind, help=text)
    parser.add_argument("--jobs", type=Path, help="JSON Lines file, one job per line (prompt, frames, seed, output, ...)")
    parser.add_argument("--output-dir", type=Path, help="folder for the outputs and manifest of --jobs")
    parser.add_argument("--resume", action="store_true", help="with --jobs: skip jobs the manifest marks done")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--save-frames", type=Path, help="also write every frame as PNG into this folder")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    return parser


def _load(args):
    overrides = {field: getattr(args, flag) for flag, (field, _, _) in FLAGS.items()}
    try:
        return load_config(args.config, overrides).dualparal
    except ConfigError as err:
        message = str(err)
        for flag, (field, _, _) in FLAGS.items():  # name the flag the user typed
            if getattr(args, flag) is not None and message.startswith(f"dualparal.{field}:"):
                message = "--" + flag.replace("_", "-") + message[len(f"dualparal.{field}") :]
        raise ConfigError(message) from None


def plan_jobs(args, cfg) -> list[Job]:
    """The jobs of this run, decided once (on rank 0): invalid, already done, or to run."""
    if args.jobs is None:
        if args.output_dir or args.resume:
            raise ConfigError("--output-dir and --resume go with --jobs")
        output = Path(cfg.output)
        if output.suffix.lower() != ".mp4":
            raise ConfigError(f"--output: {output} must end in .mp4")
        if output.exists() and not args.overwrite:
            raise ConfigError(f"--output: {output} already exists; pass --overwrite to replace it")
        return [Job(0, output.stem, output, cfg)]
    if args.output_dir is None:
        raise ConfigError("--jobs needs --output-dir")
    jobs = read_jobs(args.jobs, cfg, args.output_dir)
    done = done_outputs(args.output_dir) if args.resume else set()
    for job in jobs:
        if job.error is not None:
            continue
        if str(job.output) in done:
            job.extra["skip"] = "done"
        elif job.output.exists() and not args.overwrite:
            job.error = f"output: {job.output} already exists; pass --overwrite to replace it"
            job.config = None
    return jobs


def main(argv=None) -> int:
    logging.basicConfig(
        level=os.environ.get("DS_DUALPARAL_LOG", "INFO"),
        format=f"[rank {os.environ.get('RANK', '0')}] %(levelname)s %(name)s: %(message)s",
    )
    args = build_parser().parse_args(argv)
    try:
        cfg = _load(args)
        return _run(args, cfg)
    except (ConfigError, FileExistsError) as err:
        return _user_error(err)
    except Exception as err:
        from .weights import CheckpointError

        if isinstance(err, CheckpointError):
            return _user_error(err)
        raise


def _user_error(err: Exception) -> int:
    if os.environ.get("RANK", "0") == "0":  # every rank finds the same mistake; one says it
        print(f"generate.py: error: {err}", file=sys.stderr)
    return 2


def _run(args, cfg) -> int:
    from . import comm
    from .generation import Generator
    from .runner import run_job, summarize

    comm.init_process(cfg.comm_timeout_s)
    decision = None
    if comm.world()[0] == 0:  # rank 0 alone reads the jobs file, manifest and outputs
        try:
            decision = plan_jobs(args, cfg)
        except ConfigError as err:
            decision = str(err)
    jobs = comm.share_object(decision)
    if isinstance(jobs, str):
        raise ConfigError(jobs)
    generator = Generator(cfg)
    if generator.rank == 0:
        for job in jobs:
            if job.error is not None:
                log.error("%s (line %d): %s", job.name, job.index, job.error)
                if args.jobs is not None:
                    record(args.output_dir, dict(job=job.name, line=job.index, status="failed", output=str(job.output), seconds=0, error=job.error))
    runnable = [job for job in jobs if job.config is not None and "skip" not in job.extra]
    mine = runnable[generator.replica :: generator.num_replicas]
    texts = generator.encode([job.config for job in mine])
    results = []
    started = time.perf_counter()
    for job, text in zip(mine, texts):
        results.append(run_job(generator, job, text, args))
    summarize(generator, results, time.perf_counter() - started)
    failed = sum(job.error is not None for job in jobs) + sum(not r.ok for r in results)
    return 1 if failed and args.jobs is None else 0
