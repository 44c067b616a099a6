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
from typing import Literal, get_args, get_origin

from .config import FLAGS, ConfigError, DualParalConfig, load_config, tags
from .files import OutputError, location_problem, same_file_key
from .jobs import MANIFEST, Job, done_outputs, read_jobs, record

log = logging.getLogger("ds_dualparal")
LARGE_TFLOP = 1000.0

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, as for every other bad input
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="generate.py",
        allow_abbrev=False,  # `--frame 81` is a typo, not `--frames`
        description="Generate long videos with Wan by DualParal, pipelined over DeepSpeed ranks.",
    )
    parser.add_argument("--config", help="config JSON; only its 'dualparal' section is read (default: built-in defaults)")
    for flag, field in FLAGS.items():
        parser.add_argument("--" + flag.replace("_", "-"), dest=flag, help=DualParalConfig.model_fields[field].description,
                            **_flag_options(field))
    parser.add_argument("--lora", action="append", metavar="PATH[:SCALE[:EXPERT]]",
                        help="fuse this LoRA (.safetensors) into the weights at load; repeatable, in order; SCALE "
                             "defaults to 1.0, EXPERT (Wan2.2-A14B) is high_noise, low_noise or both (default); "
                             "the flags replace the config's 'loras'")
    parser.add_argument("--jobs", type=Path, help="JSON Lines file, one job per line (prompt, frames, seed, output, ...)")
    parser.add_argument("--output-dir", type=Path, help="folder for the outputs and manifest of --jobs")
    parser.add_argument("--resume", action="store_true", help="with --jobs: skip jobs the manifest marks done")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--save-frames", type=Path, help="also write every frame as PNG into this folder")
    parser.add_argument("--checkpoint-dir", type=Path,
                        help="single video: save the state here every --checkpoint-every iterations, and continue "
                             "from the newest checkpoint found there (run the same command again to resume)")
    parser.add_argument("--checkpoint-every", type=int, metavar="N", help="iterations between checkpoints")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    return parser


def _flag_options(field: str) -> dict:
    """argparse keywords of a setting's flag: type and shown choices from its annotation, then its own tags.

    A Literal's values are shown, not enforced here: the config check refuses a wrong one with the
    same one-line message as in a config file. Any other type than int, float or str (a list, a
    model) arrives as the flag's text, for the field's own validator to convert.
    """
    annotation = DualParalConfig.model_fields[field].annotation
    kinds = (annotation,) if get_origin(annotation) is Literal else get_args(annotation) or (annotation,)
    kind = next(k for k in kinds if k is not type(None))
    if get_origin(kind) is Literal:
        options = {"type": str, "metavar": "{" + ",".join(get_args(kind)) + "}"}
    else:
        options = {"type": kind if kind in (int, float, str) else str}
    return {**options, **tags(field)["flag_options"]}


def config_from_args(args):
    """The run config: the config file (or defaults) with the flags applied."""
    overrides = {field: getattr(args, flag) for flag, field in FLAGS.items()}
    if args.lora:
        overrides["loras"] = [parse_lora(text) for text in args.lora]
    return load_config(args.config, overrides).dualparal


def parse_lora(text: str) -> dict:
    """`PATH[:SCALE[:EXPERT]]` -> a `loras` entry; a suffix that is neither stays part of the path."""
    entry = {"path": text}
    head, _, tail = text.rpartition(":")
    if head and tail in ("high_noise", "low_noise", "both"):
        entry.update(path=head, expert=tail)
        head, _, tail = head.rpartition(":")
    try:
        scale = float(tail)
    except ValueError:
        return entry
    if head:
        entry.update(path=head, scale=scale)
    return entry


def _name_flag(args, message: str) -> str:
    """`dualparal.num_frames: ...` -> `--frames: ...` when the value came from that flag."""
    if args.lora and message.startswith("dualparal.loras"):
        return "--lora" + message[len("dualparal.loras"):]
    for flag, field in FLAGS.items():
        prefix = f"dualparal.{field}"
        if getattr(args, flag) is not None and message.startswith(prefix) and message[len(prefix):][:1] in (":", "["):
            return "--" + flag.replace("_", "-") + message[len(prefix):]  # `--prompts[1]: ...` names the segment
    return message


def check_args(args, cfg) -> None:
    """Mistakes visible in the flags and config alone, found by every rank before anything heavy starts."""
    if (args.checkpoint_dir is None) != (args.checkpoint_every is None):
        raise ConfigError("--checkpoint-dir and --checkpoint-every N go together")
    if args.checkpoint_every is not None and args.checkpoint_every < 1:
        raise ConfigError(f"--checkpoint-every: {args.checkpoint_every} must be an integer >= 1")
    if args.jobs is None:
        if args.output_dir is not None or args.resume:
            raise ConfigError("--output-dir and --resume go with --jobs")
        if Path(cfg.output).suffix.lower() != ".mp4":
            where = "--output" if args.output is not None else "dualparal.output"
            raise ConfigError(f"{where}: {cfg.output} must end in .mp4")
        return
    if args.output_dir is None:
        raise ConfigError("--jobs needs --output-dir")
    if args.checkpoint_dir is not None:
        raise ConfigError(
            "--checkpoint-dir: checkpoints are for a single video, not for --jobs (--resume skips done jobs)")
    if args.output is not None:
        raise ConfigError("--output: names a single video; with --jobs give each job an 'output' (inside --output-dir)")
    if cfg.save_latents is not None:
        where = "--save-latents" if args.save_latents is not None else "dualparal.save_latents"
        raise ConfigError(f"{where}: names a single file; with --jobs give each job a 'save_latents' (inside --output-dir)")


def plan_jobs(args, cfg) -> list[Job]:
    """The jobs of this run, decided once (on rank 0): invalid, already done, or to run.

    Every place the run writes is checked here, before any weights load: it can be made and written,
    it is not another output of the run (nor the manifest), and it does not exist yet (without --overwrite).
    """
    if args.jobs is None:
        job = Job(0, Path(cfg.output).stem, Path(cfg.output), cfg)
        paths = _outputs(job, args)
        if args.checkpoint_dir is not None:
            paths.append(("--checkpoint-dir", args.checkpoint_dir))
        seen: dict[str, str] = {}
        for flag, path in paths:
            problem = location_problem(path, folder=flag in ("--save-frames", "--checkpoint-dir"))
            if problem is not None:
                raise ConfigError(f"{flag}: {_shown(path)} {problem}")
            key = same_file_key(path)
            if key in seen:
                raise ConfigError(f"{flag}: {path} is also the {seen[key]}; every output needs its own path")
            seen[key] = flag
        for flag, path in paths:
            if flag != "--checkpoint-dir" and _exists(path) and not args.overwrite:
                raise ConfigError(f"{flag}: {path} already exists; pass --overwrite to replace it")
        return [job]
    _check_output_dir(args.output_dir)
    jobs = read_jobs(args.jobs, cfg, args.output_dir)
    done = done_outputs(args.output_dir) if args.resume else set()
    for job in jobs:
        if job.error is not None:
            continue
        if job.relative in done:
            job.done = True
            continue
        outputs = _outputs(job, args)
        problem = _frames_link(job, args)
        problem = problem or next((f"{_key(flag)}: {_shown(path)} {problem}" for flag, path in outputs
                        if (problem := location_problem(path, folder=flag == "--save-frames")) is not None), None)
        existing = [(flag, path) for flag, path in outputs if _exists(path)]
        if problem is None and existing and not args.overwrite:
            flag, path = existing[0]
            problem = f"{_key(flag)}: {path} already exists; pass --overwrite to replace it"
        if problem is not None:
            job.error = problem
            job.config = None
    return jobs


def _frames_link(job: Job, args) -> str | None:
    """A job's frames folder `<--save-frames>/<name>` that is a symbolic link: writing through it would
    leave --save-frames (or share another job's folder), and a folder cannot replace a link by rename."""
    if args.save_frames is None:
        return None
    path = args.save_frames / job.name  # a job's name is one plain component
    if path.is_symlink():
        return f"--save-frames: {_shown(path)} is a symbolic link; each job's frames folder is made inside --save-frames (remove the link)"
    return None


def _key(flag: str) -> str:
    """A job's field for an output flag (--save-frames stays a flag: it is not a job field)."""
    return {"--output": "output", "--save-latents": "save_latents"}.get(flag, flag)


def _shown(path) -> str:
    text = str(path)
    return repr(text) if not text.isprintable() else text


def _exists(path: Path) -> bool:
    """An output that is there already; an empty folder (made for the frames) does not count."""
    if path.is_dir() and not path.is_symlink():
        return any(path.iterdir())
    return path.exists() or path.is_symlink()


def _check_output_dir(output_dir: Path) -> None:
    problem = location_problem(output_dir, folder=True)
    if problem is not None:
        raise ConfigError(f"--output-dir: {_shown(output_dir)} {problem}")
    manifest = output_dir / MANIFEST
    if manifest.is_symlink() or (manifest.exists() and not manifest.is_file()):
        raise ConfigError(f"--output-dir: {manifest} is not a regular file; move it away")


def _outputs(job: Job, args=None) -> list[tuple[str, Path]]:
    paths = [("--output", job.output)]
    if job.config.save_latents is not None:
        paths.append(("--save-latents", Path(job.config.save_latents)))
    if args is not None and args.save_frames is not None:
        paths.append(("--save-frames", args.save_frames / job.name if args.jobs else args.save_frames))
    return paths


def check_model(cfg, device_type: str = "cpu"):
    """This node's model folder has every component, whole (a hub id is downloaded here), and the
    model-level settings fit it and this device. Returns the (first) transformer's WanConfig."""
    import re

    from .config import ATTENTION_BACKENDS, CPU_ATTENTION_BACKENDS
    from .denoise import make_scheduler
    from .model import WanConfig
    from .modelcheck import check_model_folder
    from .weights import ModelError, resolve_model

    folder = check_model_folder(resolve_model(cfg.model))
    try:
        make_scheduler(cfg.scheduler, cfg.flow_shift, cfg.num_inference_steps, folder.path / "scheduler")
    except Exception as err:  # diffusers' own checks of a config it accepts as JSON
        raise ModelError(f"{folder.path / 'scheduler'}: cannot make the {cfg.scheduler} scheduler "
                              f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(folder.path / "tokenizer")
    except Exception as err:  # a tokenizer folder transformers cannot read, in whatever way
        raise ModelError(f"{folder.path / 'tokenizer'}: cannot load the tokenizer "
                              f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    wan = WanConfig.from_json(folder.experts[0] / "config.json")
    if cfg.loras:
        from .lora import check_loras

        check_loras(cfg.loras, [WanConfig.from_json(f / "config.json") for f in folder.experts])
    # DeepSpeed splits the layers (embedding, one per transformer block, head) by the partition method.
    names = ["WanEmbedLayer"] + ["WanBlockLayer"] * wan.num_layers + ["WanHeadLayer"]
    method = cfg.partition_method
    if method.lower().startswith("type:"):  # DeepSpeed fails (a traceback) when the regex matches no layer
        pattern = re.compile(method[len("type:"):], re.IGNORECASE)
        if not any(pattern.search(name) for name in names):
            raise ConfigError(f"dualparal.partition_method: {method!r} matches none of the layer classes "
                              f"({', '.join(sorted(set(names)))})")
    backend = cfg.attention_backend
    if device_type == "cpu" and backend is not None and backend not in CPU_ATTENTION_BACKENDS:
        gpu_only = [b for b in ATTENTION_BACKENDS if b not in CPU_ATTENTION_BACKENDS]
        raise ConfigError(f"dualparal.attention_backend: {backend!r} needs a GPU ({', '.join(gpu_only)} do); "
                          f"on CPU use {', '.join(CPU_ATTENTION_BACKENDS)} or null")
    return wan


def check_work(args, jobs: list[Job], wan, device_type: str) -> list[tuple[int, str]]:
    """Refuses (one line) a job that cannot fit the device; returns what each other job costs, as
    (log level, line) for rank 0 to say once every check has passed."""
    from .estimate import device_memory, estimate, refusal

    memory = device_memory(device_type)
    costs = []
    schedules: dict[tuple, str | None] = {}
    for job in jobs:
        if job.config is None or job.done:
            continue
        cfg = job.config
        key = (cfg.scheduler, cfg.flow_shift, cfg.num_inference_steps, cfg.model)
        if key not in schedules:
            schedules[key] = scheduler_problem(cfg)
        if schedules[key] is not None:
            if args.jobs is None:
                raise ConfigError(f"--steps/--scheduler/--flow-shift: {schedules[key]}")
            job.error, job.config = f"num_inference_steps/scheduler/flow_shift: {schedules[key]}", None
            continue
        work = estimate(job.config, wan)
        reason = refusal(work, memory)
        if reason is None:
            costs.extend((logging.WARNING, f"{job.name}: {line}") for line in unused_segments(job.config))
            # a large job is said loudly, before it starts (a TFLOP is minutes on a CPU, a second on a GPU)
            costs.append((logging.WARNING if work.tflop > LARGE_TFLOP else logging.INFO, f"{job.name}: {work.describe()}"))
            continue
        cfg = job.config
        message = f"{cfg.num_frames} frames of {cfg.height}x{cfg.width} {reason}"
        if args.jobs is None:
            raise ConfigError(f"--frames/--height/--width: {message}")
        job.error, job.config = f"num_frames/height/width: {message}", None
    return costs


def unused_segments(cfg) -> list[str]:
    """A line for each segment of the prompt schedule that no block takes (shorter than a block)."""
    from .prompts import prompt_plan

    from .config import TEMPORAL_FACTOR

    return [f"prompts[{i}] (from_frame {cfg.prompts[i].from_frame}) holds no block's middle frame, so no block takes "
            f"its prompt; make it at least a block ({TEMPORAL_FACTOR * cfg.block_size} video frames) long"
            for i in prompt_plan(cfg).unused]


def scheduler_problem(cfg) -> str | None:
    """Why a job's scheduler cannot take its steps, found by running them on a one-value latent before any
    work starts (about a millisecond a step); None if it can. On several stages a scheduler that fails
    in the middle of a generation ends the whole run, since the other stages wait in lockstep. Known
    case: diffusers' UniPC fails at the last step from about 334 steps at flow_shift 3 (AssertionError)."""
    import torch

    from .denoise import make_scheduler
    from .weights import resolve_model

    steps = cfg.num_inference_steps
    try:
        scheduler = make_scheduler(cfg.scheduler, cfg.flow_shift, steps, resolve_model(cfg.model) / "scheduler")
    except Exception as err:  # noqa: BLE001 - diffusers' own checks, in whatever form
        return f"cannot make the {cfg.scheduler} scheduler for {steps} steps ({_error_line(err)})"
    latents = torch.zeros(1, 1, 1, 1, 1)
    for step, t in enumerate(scheduler.timesteps):
        try:
            latents = scheduler.step(torch.zeros_like(latents), t, latents, return_dict=False)[0]
        except Exception as err:  # noqa: BLE001
            return (f"the {cfg.scheduler} scheduler fails at step {step + 1} of {steps} at flow_shift "
                    f"{cfg.flow_shift} ({_error_line(err)}); use fewer steps or another scheduler")
    return None


def _error_line(err: BaseException) -> str:
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def open_checkpoints(args, cfg):
    """The checkpoint folder of a single video and the iteration its newest checkpoint continues from."""
    from .checkpoint import Checkpoints
    from .timeline import BlockTimeline
    from .weights import resolve_model

    timeline = BlockTimeline(cfg.latent_frames, cfg.block_size, cfg.context, cfg.num_inference_steps)
    return Checkpoints.open(args.checkpoint_dir, args.checkpoint_every, cfg, resolve_model(cfg.model),
                            timeline.num_iterations)


class _AgreedError(Exception):
    """A mistake that every rank knows of, so that rank 0 alone reports it."""


def main(argv=None) -> int:
    logging.basicConfig(
        level=os.environ.get("DS_DUALPARAL_LOG", "INFO"),
        format=f"[rank {os.environ.get('RANK', '0')}] %(levelname)s %(name)s: %(message)s",
    )
    from . import interrupt

    interrupt.install()
    try:
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:
        return _interrupted()
    try:
        cfg = config_from_args(args)
        check_args(args, cfg)
        return _run(args, cfg)
    except (ConfigError, _AgreedError) as err:
        if os.environ.get("RANK", "0") == "0":  # every rank finds the same mistake; one says it
            _say(_name_flag(args, str(err)))
        if isinstance(err, _AgreedError):
            # Every rank is here: leave the process group together. Exiting with it alive
            # sometimes aborted both ranks ("terminate called without an active exception").
            from . import comm

            comm.shutdown()
        return 2
    except FileExistsError as err:  # found by this rank alone: its output appeared while it was written
        _say(str(err))
        return _leave(2)
    except OutputError as err:  # found by this rank alone: an output it cannot write (disk full, ...)
        _say(str(err))
        return _leave(1)
    except KeyboardInterrupt:  # Ctrl-C: temporaries are gone (atomic_output), the finished outputs stay
        return _leave(_interrupted())
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
    comm = sys.modules.get("ds_dualparal.comm")
    if comm is None:
        return code
    if not comm.several_ranks():
        # A lone process leaves its group: exiting with it alive sometimes aborts at exit
        # ("terminate called without an active exception", seen after Ctrl-C).
        comm.shutdown()
        return code
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _interrupted() -> int:
    if os.environ.get("RANK", "0") == "0":
        _say("interrupted (Ctrl-C); unfinished outputs were removed")
    return 130


def _say(message: str) -> None:
    # Messages from below (a hub download, a checkpoint) may span lines; the user gets one.
    print("generate.py: error: " + " ".join(message.splitlines()), file=sys.stderr)


def _agree(error: str | None) -> None:
    """Collective: every rank learns the first rank's error, if any, and raises it."""
    from . import comm

    errors = comm.gather_objects(error)
    first = next((rank for rank, e in enumerate(errors) if e is not None), None)
    if first is not None:
        raise _AgreedError(errors[first] if first == 0 else f"rank {first}: {errors[first]}")


def _decide(args, cfg):
    """Rank 0 reads the jobs file, manifest, outputs and checkpoints for everyone; every rank checks its
    model folder. Returns the jobs and the checkpoint folder (None without --checkpoint-dir)."""
    from . import comm
    from .checkpoint import ResumeError
    from .weights import ModelError

    import torch

    error = jobs = checkpoints = None
    costs = []
    rank, world_size = comm.world()
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        cfg.pipeline_topology(world_size)
        if rank == 0:
            jobs = plan_jobs(args, cfg)
        wan = check_model(cfg, device_type)
        if rank == 0:
            costs = check_work(args, jobs, wan, device_type)
        if rank == 0 and args.checkpoint_dir is not None:
            checkpoints = open_checkpoints(args, cfg)
    except (ConfigError, ModelError, ResumeError) as err:
        error = str(err)
    _agree(error)
    for level, line in costs:
        log.log(level, "%s", line)
    return comm.share_object((jobs, checkpoints))


def _load(cfg):
    """This rank's stage; a rank that cannot load it (e.g. a shard missing on its node) stops them all."""
    from .generation import Generator
    from .weights import ModelError

    generator = error = None
    try:
        generator = Generator(cfg)
    except (ConfigError, ModelError) as err:
        error = str(err)
    _agree(error)
    return generator


def _run(args, cfg) -> int:
    from . import comm

    comm.init_process(cfg.comm_timeout_s)
    jobs, checkpoints = _decide(args, cfg)
    if comm.world()[0] == 0:
        for job in jobs:
            if job.error is not None:
                log.error("%s (line %d): %s", job.name, job.index, job.error)
                record(args.output_dir, dict(
                    job=job.name, line=job.index, status="failed", output=job.relative, seconds=0, error=job.error,
                ))
            elif job.done:
                log.info("%s (line %d): skipped, the manifest marks %s done", job.name, job.index, job.relative)
    runnable = [job for job in jobs if job.config is not None and not job.done]
    invalid = sum(job.error is not None for job in jobs)  # the same on every rank: the jobs are shared
    if not runnable:  # the same on every rank: nothing to load the model for
        log.info("nothing to run")
        comm.shutdown()
        return 1 if invalid else 0
    return _generate(_load(cfg), args, runnable, checkpoints, invalid)


def _generate(generator, args, runnable: list[Job], checkpoints=None, invalid: int = 0) -> int:
    """This rank's replica takes every num_replicas-th job. Exit code 1 when any job failed (or was invalid)."""
    from . import comm
    from .runner import OutputOptions, run_job, summarize

    mine = runnable[generator.replica :: generator.num_replicas]
    texts = generator.encode([job.config for job in mine])
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
    comm.shutdown()
    return 1 if failed or invalid else 0
