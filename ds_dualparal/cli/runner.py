"""Running one job on this rank: streaming its finished blocks to the mp4 on a first stage,
saving latents atomically, checkpoints and resume, progress on rank 0, the manifest line and the
closing summary."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from tqdm import tqdm

from ..files import OutputError, atomic_output
from ..output.checkpoint import Checkpoints
from ..output.stream import BlockOutput, FrameSink
from ..output.video import Mp4Writer, StreamingDecoder, save_frames
from ..pipeline import comm
from ..pipeline.clip import Clip, latents_metadata, load_clip
from ..pipeline.engine import Checkpointing
from ..pipeline.generation import Result
from . import interrupt, timing
from .jobs import record

log = logging.getLogger(__name__)


@dataclass
class JobResult:
    name: str
    ok: bool
    seconds: float = 0.0
    frames: int = 0
    error: str | None = None


class JobFailed(Exception):
    """A job-level failure found on the first stage (a write error, non-finite latents): the job fails,
    the run and the other stages go on."""


def save_latents(path: str | Path, latents: torch.Tensor, overwrite: bool = True,
                 metadata: dict[str, str] | None = None) -> None:
    """Final latents as safetensors (key 'latents'), written under a unique temporary name then renamed;
    `metadata`: the file's text metadata (the VAE that gives them meaning, pipeline/clip.py)."""
    with atomic_output(path, overwrite=overwrite) as partial:
        try:
            save_file({"latents": latents.detach().float().cpu().contiguous()}, str(partial), metadata=metadata)
        except (OSError, SafetensorError) as err:  # safetensors' I/O errors (disk full) are not OSErrors
            raise OutputError(f"cannot write {path}: {getattr(err, 'strerror', None) or err}") from None


def check_finite(block: int, latents: torch.Tensor, cfg=None) -> None:
    """Non-finite latents (an overflow) fail the job; the message names what of `cfg` can cause it."""
    if not bool(torch.isfinite(latents).all()):
        bad = int((~torch.isfinite(latents)).sum())
        causes = ["an extreme --guidance or --flow-shift"]
        if cfg is not None and cfg.loras:
            causes.append("the LoRA's scale or values")
        raise JobFailed(f"block {block}: {bad} of {latents.numel()} latent values are not finite (NaN or inf); "
                        f"the video would be garbage (look at {' or '.join(causes)})")


def generate_streaming(generator, request, sinks: list[FrameSink], keep_in_step: bool = False,
                       cfg=None, clip: Clip | None = None, decode_inline: bool | None = None) -> tuple[Result, int]:
    """First stage: runs `request` with each finished block decoded and passed to `sinks` beside the
    pipeline (see stream.py); returns once every frame is written, with the number of frames.

    The clip it continues comes first: a video clip's own frames, else its latents decoded; its
    latents go through the decoder either way, so the join decodes as one video would.
    A resumed run decodes the blocks that were final before the checkpoint from its latents first,
    so the new mp4 holds every frame (the causal decoder must see every block in order anyway).

    A job-level failure on the first stage (an output that cannot be written, non-finite latents)
    fails this job only: with one stage it stops at once; with more, the first stage stops writing and
    runs on in step with the others to the end of the generation (`keep_in_step`), then raises it.

    `decode_inline` (None: with a single stage on CUDA) queues each block's decode on the pipeline's stream
    between block-steps instead of beside them (output/stream.py says why).
    """
    if decode_inline is None:
        decode_inline = generator.device.type == "cuda" and generator.topology.get_dim("pipe") == 1
    output = BlockOutput(StreamingDecoder(generator.vae), sinks, generator.device, inline=decode_inline,
                         stream=generator.stream if decode_inline else None)
    failure: list[BaseException] = []  # the first job-level failure, kept while the other stages run on

    def on_block_done(block, latents):
        if failure:
            return
        try:
            check_finite(block, latents, cfg)
            output.submit(block, latents)
        except (OSError, JobFailed) as err:
            if not keep_in_step:
                raise
            failure.append(err)

    closing_error = None
    failing = False
    try:
        checkpointing = request.checkpointing
        if clip is not None:
            output.submit(-1, clip.latents, frames=clip.frames)
        for block in range(max(0, checkpointing.start - request.plan.timeline.num_steps + 1)):
            on_block_done(block, checkpointing.resume.latents[block])
        request.on_block_done = on_block_done
        result = generator.generate(request)
        timing.lap("generation")
    except BaseException:
        failing = True  # nothing will be kept: the blocks still queued are not decoded
        raise
    finally:
        try:
            output.close(cancel=failing)
        except Exception as err:  # noqa: BLE001 - raised below unless the generation itself failed
            closing_error = err
    if failure:
        raise failure[0]
    if closing_error is not None:
        raise closing_error
    return result, output.frames_written


@dataclass(frozen=True)
class OutputOptions:
    """What the command line says about where a run's jobs write, beyond each job's own config."""

    overwrite: bool = False
    save_frames: Path | None = None  # PNG frames; a batch writes each job's into a subfolder named after it
    manifest_dir: Path | None = None  # a batch (--jobs): the --output-dir whose manifest records each job

    @classmethod
    def from_args(cls, args) -> OutputOptions:
        return cls(args.overwrite, args.save_frames, args.output_dir if args.jobs is not None else None)

    @property
    def batch(self) -> bool:
        return self.manifest_dir is not None


def run_job(generator, job, text, options: OutputOptions, checkpoints: Checkpoints | None = None) -> JobResult:
    """Generates one job; with `checkpoints`, resumes from its start iteration and saves new ones."""
    cfg = job.config
    start = checkpoints.start if checkpoints is not None else 0
    if not generator.is_first:
        result = generator.generate(generator.request(cfg, checkpointing=Checkpointing(start)))
        timing.lap("generation")
        return JobResult(job.name, True, result.seconds, cfg.num_frames)

    vae = generator.vae  # loaded by the first job
    timing.lap("loading")
    clip = load_clip(cfg, vae, generator.device) if cfg.continue_from is not None else None
    request = generator.request(cfg, text, clip=None if clip is None else clip.latents)
    timing.lap("encoding")  # a clip, an image
    timeline = request.plan.timeline
    if checkpoints is not None:
        resume = checkpoints.load(request.plan, generator.device) if start else None
        request.checkpointing = Checkpointing(start, checkpoints.every, resume, checkpoints.save)
        timing.lap("loading")
    total = timeline.num_blocks * timeline.num_steps
    done = sum(1 for step in timeline.block_steps() if step.iteration < start)
    bar = tqdm(total=total, initial=done, desc=job.name, unit="block-step", disable=generator.rank != 0)

    def on_step():
        bar.update()
        interrupt.check()  # a Ctrl-C that Python dropped (it landed in a destructor) ends the job here

    request.on_step = on_step
    single_stage = generator.topology.get_dim("pipe") == 1
    frames_done = 0
    started = time.perf_counter()
    try:
        with contextlib.ExitStack() as outputs:
            try:
                writer = outputs.enter_context(Mp4Writer(job.output, cfg.fps, overwrite=options.overwrite))
                sinks = [lambda frames, _: writer.append(frames)]
                if options.save_frames is not None:
                    final_frames = options.save_frames / job.name if options.batch else options.save_frames
                    frames_dir = outputs.enter_context(atomic_output(final_frames, overwrite=options.overwrite, folder=True))

                    def write_frames(frames, first):
                        try:
                            save_frames(frames_dir, frames, first)
                        except OSError as err:
                            raise OutputError(f"cannot write frames into {final_frames}: {err.strerror or err}") from None

                    sinks.append(write_frames)
            except OSError:
                # An output that cannot be opened (it appeared since the plan, the disk is full): the
                # other stages are already in this generation, so the first stage runs it with them, to
                # stay in step for the next job, and writes nothing.
                if not single_stage:
                    generator.generate(request)
                raise
            result, frames_done = generate_streaming(generator, request, sinks, keep_in_step=not single_stage,
                                                     cfg=cfg, clip=clip)
            if cfg.save_latents:  # inside the writer: a job whose latents fail leaves no mp4 behind
                made_with = None if generator.folder is None else latents_metadata(generator.folder.path)
                save_latents(cfg.save_latents, result.latents, overwrite=options.overwrite, metadata=made_with)
    except (OSError, JobFailed) as err:  # this job's own outputs or values: the job fails, the run goes on
        outcome = _failed(job, err, started)
    except Exception as err:
        # Anything else fails the job where no other stage waits on this one (a batch on one stage).
        if not options.batch or not single_stage:
            raise
        outcome = _failed(job, err, started)
    else:
        # the whole job: denoising and the decode of the last block, which only ends with it
        outcome = JobResult(job.name, True, time.perf_counter() - started, frames_done)
        if checkpoints is not None:  # the video is out: nothing is left to resume
            checkpoints.clear()
    finally:
        bar.close()
    timing.lap("last decode")  # the decode of the blocks still queued when the denoising ended, the outputs closed
    if options.batch:
        record(options.manifest_dir, dict(
            job=job.name, line=job.index, status="done" if outcome.ok else "failed", output=job.relative,
            seconds=round(outcome.seconds, 3), error=outcome.error, rank=generator.rank,
        ))
    log.info("%s: %s (%d frames, %.1fs)", job.name, job.output if outcome.ok else "failed", outcome.frames, outcome.seconds)
    return outcome


def _failed(job, err: BaseException, started: float) -> JobResult:
    message = " ".join(str(err).splitlines()) or type(err).__name__
    log.error("%s failed: %s", job.name, message)
    return JobResult(job.name, False, time.perf_counter() - started, error=message)


def summarize(generator, results: list[JobResult], seconds: float) -> int:
    """Rank 0 logs the jobs and frames of every replica, seconds, frames/s and every rank's peak memory.

    Collective; returns the number of jobs that failed on any replica (the same on every rank)."""
    peak = torch.cuda.max_memory_allocated(generator.device) if generator.device.type == "cuda" else None
    # Frames are counted on first stages only: the other stages of a replica ran the same jobs.
    done = [r for r in results if r.ok] if generator.is_first else []
    failed = sum(not r.ok for r in results) if generator.is_first else 0
    ranks = comm.gather_objects((peak, len(done), sum(r.frames for r in done), seconds, failed))
    failed = sum(r[4] for r in ranks)
    if generator.rank != 0:
        return failed
    jobs = sum(r[1] for r in ranks)
    frames = sum(r[2] for r in ranks)
    seconds = max(r[3] for r in ranks)  # replicas run side by side
    memory = ", ".join(f"rank {i}: {r[0] / 2**30:.2f} GiB" for i, r in enumerate(ranks) if r[0] is not None) or "n/a (CPU)"
    log.info(
        "done: %d job(s) on %d replica(s) in %.1fs, %d frames, %.2f frames/s; peak memory %s",
        jobs, generator.num_replicas, seconds, frames, frames / seconds if seconds else 0.0, memory,
    )
    if failed:
        log.error("%d job(s) failed", failed)
    return failed
