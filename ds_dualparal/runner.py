"""Running one job on this rank: streaming its finished blocks to the mp4 on a first stage,
saving latents atomically, checkpoints and resume, progress on rank 0, the manifest line and the
closing summary."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from . import comm
from .checkpoint import Checkpoints
from .engine import Checkpointing
from .generation import Result
from .jobs import record
from .stream import BlockOutput, FrameSink
from .video import Mp4Writer, StreamingDecoder, save_frames

log = logging.getLogger(__name__)


@dataclass
class JobResult:
    name: str
    ok: bool
    seconds: float = 0.0
    frames: int = 0
    error: str | None = None


def save_latents(path: str | Path, latents: torch.Tensor) -> None:
    """Final latents as safetensors (key 'latents'), written under a temporary name then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    save_file({"latents": latents.detach().float().cpu().contiguous()}, str(partial))
    os.replace(partial, path)


def generate_streaming(generator, request, sinks: list[FrameSink]) -> tuple[Result, int]:
    """First stage: runs `request` with each finished block decoded and passed to `sinks` beside the
    pipeline (see stream.py); returns once every frame is written, with the number of frames.

    A resumed run decodes the blocks that were final before the checkpoint from its latents first,
    so the output holds every frame (the causal decoder must see every block in order anyway).
    """
    output = BlockOutput(StreamingDecoder(generator.vae), sinks, generator.device)
    try:
        checkpointing = request.checkpointing
        for block in range(max(0, checkpointing.start - request.plan.timeline.num_steps + 1)):
            output.submit(block, checkpointing.resume.latents[block])
        request.on_block_done = output.submit
        result = generator.generate(request)
    finally:
        output.close()
    return result, output.frames_written


def run_job(generator, job, text, args, checkpoints: Checkpoints | None = None) -> JobResult:
    """Generates one job; with `checkpoints`, resumes from its start iteration and saves new ones."""
    cfg = job.config
    start = checkpoints.start if checkpoints is not None else 0
    if not generator.is_first:
        result = generator.generate(generator.request(cfg, checkpointing=Checkpointing(start)))
        return JobResult(job.name, True, result.seconds, cfg.num_frames)

    request = generator.request(cfg, text)
    timeline = request.plan.timeline
    if checkpoints is not None:
        resume = checkpoints.load(request.plan, generator.device) if start else None
        request.checkpointing = Checkpointing(start, checkpoints.every, resume, checkpoints.save)
    total = timeline.num_blocks * timeline.num_steps
    done = sum(1 for step in timeline.block_steps() if step.iteration < start)
    bar = tqdm(total=total, initial=done, desc=job.name, unit="block-step", disable=generator.rank != 0)
    request.on_step = bar.update
    started = time.perf_counter()
    try:
        with Mp4Writer(job.output, cfg.fps, overwrite=args.overwrite) as writer:
            sinks = [lambda frames, _: writer.append(frames)]
            if args.save_frames is not None:
                folder = args.save_frames / job.name if args.jobs else args.save_frames
                sinks.append(lambda frames, first: save_frames(folder, frames, first))
            result, frames_done = generate_streaming(generator, request, sinks)
            if cfg.save_latents:  # inside the writer: a job whose latents fail leaves no mp4 behind
                save_latents(cfg.save_latents, result.latents)
    except (OSError, RuntimeError) as err:
        # A failed job is recorded and the batch goes on only where no other stage waits on this one.
        if args.jobs is None or generator.topology.get_dim("pipe") > 1:
            raise
        log.error("%s failed: %s", job.name, err)
        outcome = JobResult(job.name, False, time.perf_counter() - started, error=str(err))
    else:
        # the whole job: denoising and the decode of the last block, which only ends with it
        outcome = JobResult(job.name, True, time.perf_counter() - started, frames_done)
        if checkpoints is not None:  # the video is out: nothing is left to resume
            checkpoints.clear()
    finally:
        bar.close()
    if args.jobs is not None:
        record(args.output_dir, dict(
            job=job.name, line=job.index, status="done" if outcome.ok else "failed", output=job.relative,
            seconds=round(outcome.seconds, 3), error=outcome.error, rank=generator.rank,
        ))
    log.info("%s: %s (%d frames, %.1fs)", job.name, job.output if outcome.ok else "failed", outcome.frames, outcome.seconds)
    return outcome


def summarize(generator, results: list[JobResult], seconds: float) -> None:
    """Rank 0 logs the jobs and frames of every replica, seconds, frames/s and every rank's peak memory."""
    peak = torch.cuda.max_memory_allocated(generator.device) if generator.device.type == "cuda" else None
    # Frames are counted on first stages only: the other stages of a replica ran the same jobs.
    done = [r for r in results if r.ok] if generator.is_first else []
    ranks = comm.gather_objects((peak, len(done), sum(r.frames for r in done), seconds))
    if generator.rank != 0:
        return
    jobs = sum(r[1] for r in ranks)
    frames = sum(r[2] for r in ranks)
    seconds = max(r[3] for r in ranks)  # replicas run side by side
    memory = ", ".join(f"rank {i}: {r[0] / 2**30:.2f} GiB" for i, r in enumerate(ranks) if r[0] is not None) or "n/a (CPU)"
    log.info(
        "done: %d job(s) on %d replica(s) in %.1fs, %d frames, %.2f frames/s; peak memory %s",
        jobs, generator.num_replicas, seconds, frames, frames / seconds if seconds else 0.0, memory,
    )
