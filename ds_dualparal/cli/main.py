"""`launch/generate.py`: one entry for a plain process, `deepspeed --num_gpus N` and `--hostfile` runs.

The run, in order: parse the flags and the config (`args`), decide the jobs and check the model on
every rank (`checks`; no rank needs another for that, so a plain process finds a mistake before any
distributed start-up), start the process group and agree on the checks' outcome, load this rank's
stage, encode the prompts and run the jobs (`runner`). Every mistake a user can make (flag, config
field, jobs line, model folder, existing output) ends the run with one line naming it and exit code 2.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from ..config import ConfigError
from ..files import OutputError
from . import timing
from .args import _name_flag, build_parser, check_args, config_from_args
from .checks import check_model, check_work, open_checkpoints, plan_jobs
from .jobs import Job, record

log = logging.getLogger("ds_dualparal")


class _AgreedError(Exception):
    """A mistake that every rank knows of, so that rank 0 alone reports it."""


def main(argv=None) -> int:
    timing.start()
    logging.basicConfig(
        level=os.environ.get("DS_DUALPARAL_LOG", "INFO"),
        format=f"[rank {os.environ.get('RANK', '0')}] %(levelname)s %(name)s: %(message)s",
    )
    from . import interrupt, signals

    interrupt.install()
    signals.install()
    try:
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt as err:
        return _interrupted(err)
    try:
        cfg = config_from_args(args)
        check_args(args, cfg)
        timing.lap("checks")
        return _run(args, cfg)
    except (ConfigError, _AgreedError) as err:
        if os.environ.get("RANK", "0") == "0":  # every rank finds the same mistake; one says it
            _say(_name_flag(args, str(err)))
        if isinstance(err, _AgreedError):
            # Every rank is here: leave the process group together. Exiting with it alive
            # sometimes aborted both ranks ("terminate called without an active exception").
            from ..pipeline import comm

            comm.shutdown()
        return 2
    except FileExistsError as err:  # found by this rank alone: its output appeared
        _say(str(err))
        return _leave(2)
    except OutputError as err:  # found by this rank alone: an output it cannot write (disk full, ...)
        _say(str(err))
        return _leave(1)
    except KeyboardInterrupt as err:  # Ctrl-C, SIGTERM, SIGHUP: temporaries are gone (atomic_output), the finished outputs stay
        if _finished is not None:  # after the summary: every output is complete
            if os.environ.get("RANK", "0") == "0":
                _say(f"interrupted ({_signal_name(err)}) after the summary; every output is complete")
            return _leave(_finished)
        return _leave(_interrupted(err))
    except Exception as err:  # a fault or a bug: say which rank and what, then fail (the launcher stops the rest)
        first_line = str(err).splitlines()[0] if str(err) else ""
        log.critical("rank %s failed: %s: %s", os.environ.get("RANK", "0"), type(err).__name__, first_line,
                     exc_info=True)
        return _leave(1)


def _leave(code: int) -> int:
    """After a failure found by this rank alone, a rank of several exits at once: its peers may be dead
    or hung, and anything that waits for them (a collective shutdown, NCCL's communicator destructors
    at interpreter exit) would hold the run until comm_timeout_s or beyond. Its outputs' temporaries
    are already gone (atomic_output), and the launcher stops the other ranks when this one exits."""
    comm = sys.modules.get("ds_dualparal.pipeline.comm")
    if comm is None:
        return code
    if not comm.several_ranks():
        # A lone process leaves its group: exiting with it alive sometimes aborts at exit
        # ("terminate called without an active exception", seen after Ctrl-C).
        comm.shutdown()
        return code
    from . import signals

    signals.continue_siblings()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _interrupted(err: KeyboardInterrupt) -> int:
    if os.environ.get("RANK", "0") == "0":
        _say(f"interrupted ({_signal_name(err)}); unfinished outputs were removed")
    return 128 + getattr(err, "signum", 2)


def _signal_name(err: KeyboardInterrupt) -> str:
    return str(err) if hasattr(err, "signum") else "Ctrl-C"


_finished: int | None = None  # the run's exit code once every job has ended and the summary is out


def _say(message: str) -> None:
    # Messages from below (a hub download, a checkpoint) may span lines; the user gets one.
    sys.stderr.write("generate.py: error: " + " ".join(message.splitlines()) + "\n")


def _agree(error: str | None) -> None:
    """Collective: every rank learns the first rank's error, if any, and raises it."""
    from ..pipeline import comm

    errors = comm.gather_objects(error)
    first = next((rank for rank, e in enumerate(errors) if e is not None), None)
    if first is not None:
        raise _AgreedError(errors[first] if first == 0 else f"rank {first}: {errors[first]}")


def _decide(args, cfg, rank: int, world_size: int):
    """Rank 0 reads the jobs file, manifest, outputs and checkpoints for everyone; every rank checks its
    model folder. Needs no other rank, so it runs before the process group starts. Returns this rank's
    error (None if none), the jobs, the checkpoint folder (None without --checkpoint-dir) and the costs."""
    import torch

    from ..output.checkpoint import ResumeError  # diffusers, through the schedulers
    from ..wan.weights import ModelError

    timing.lap("start-up")  # the runtime's imports, which the checks need too
    error = jobs = checkpoints = None
    costs = []
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        stages, _ = cfg.pipeline_topology(world_size)
        if rank == 0:
            jobs = plan_jobs(args, cfg)
        # a replica's first stage (pipe is the fastest axis, generation.Generator) encodes the prompts:
        # it keeps the tokenizer the check reads
        wan = check_model(cfg, device_type, keep_tokenizer=rank % stages == 0)
        if rank == 0:
            costs = check_work(args, jobs, wan, device_type)
        if rank == 0 and args.checkpoint_dir is not None:
            checkpoints = open_checkpoints(args, cfg)
    except (ConfigError, ModelError, ResumeError) as err:
        error = str(err)
    return error, jobs, checkpoints, costs


def _load(cfg, device):
    """This rank's stage; a rank that cannot load it (e.g. a shard missing on its node) stops them all."""
    from ..pipeline.generation import Generator
    from ..wan.weights import ModelError

    generator = error = None
    try:
        generator = Generator(cfg, device)
    except (ConfigError, ModelError) as err:
        error = str(err)
    _agree(error)
    return generator


def _run(args, cfg) -> int:
    from ..pipeline import comm

    rank, world_size = comm.launched_world()
    error, jobs, checkpoints, costs = _decide(args, cfg, rank, world_size)
    if error is not None and world_size == 1:  # no rank to agree with: say it before any start-up
        raise _AgreedError(error)
    timing.lap("checks")
    device = comm.init_process(cfg.comm_timeout_s)
    timing.lap("start-up")
    _agree(error)
    for level, line in costs:
        log.log(level, "%s", line)
    jobs, checkpoints = comm.share_object((jobs, checkpoints))
    if rank == 0:
        for job in jobs:
            if job.error is not None:
                log.error("%s (line %d): %s", job.name, job.index, job.error)
                record(args.output_dir, dict(
                    job=job.name, line=job.index, status="failed", output=job.relative, seconds=0, error=job.error,
                ))
            elif job.unrecorded:
                log.warning("%s (line %d): %s is complete but the manifest had no line for it (the run that made "
                            "it stopped before recording it); recorded as done, not made again (remove it to "
                            "make it again)", job.name, job.index, job.relative)
                record(args.output_dir, dict(job=job.name, line=job.index, status="done", output=job.relative,
                                             seconds=0, error=None))
            elif job.done:
                log.info("%s (line %d): skipped, the manifest marks %s done", job.name, job.index, job.relative)
    runnable = [job for job in jobs if job.config is not None and not job.done]
    invalid = sum(job.error is not None for job in jobs)  # the same on every rank: the jobs are shared
    if not runnable:  # the same on every rank: nothing to load the model for
        log.info("nothing to run")
        comm.shutdown()
        return 1 if invalid else 0
    timing.lap("checks")
    generator = _load(cfg, device)
    timing.lap("loading")
    return _generate(generator, args, runnable, checkpoints, invalid)


def _generate(generator, args, runnable: list[Job], checkpoints=None, invalid: int = 0) -> int:
    """This rank's replica takes every num_replicas-th job. Exit code 1 when any job failed (or was invalid)."""
    from ..pipeline import comm
    from .runner import OutputOptions, run_job, summarize

    mine = runnable[generator.replica :: generator.num_replicas]
    texts = generator.encode([job.config for job in mine])
    timing.lap("encoding")
    if generator.device.type == "cuda":  # the summary's peak is the generation's, not the text encoder's
        import torch

        log.info("rank %d: peak memory while encoding prompts %.2f GiB", generator.rank,
                 torch.cuda.max_memory_allocated(generator.device) / 2**30)
        torch.cuda.reset_peak_memory_stats(generator.device)
    options = OutputOptions.from_args(args)
    results = []
    started = time.perf_counter()
    for job, text in zip(mine, texts):
        results.append(run_job(generator, job, text, options, checkpoints))
    failed = summarize(generator, results, time.perf_counter() - started)
    timing.lap("summary")
    if generator.rank == 0:
        log.info("%s", timing.line())
    global _finished
    _finished = 1 if failed or invalid else 0
    comm.shutdown()
    return _finished

