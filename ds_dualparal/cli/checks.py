"""Pre-flight checks: everything about a run that can be found wrong before the model loads.

The jobs and every place they write (`plan_jobs`, rank 0), the model folder and the model-level
settings (`check_model`, every rank: each reads its own node's folder), what each job costs against the
device (`check_work`) and whether its scheduler can take its steps, and the checkpoint folder.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..config import FLAGS, ConfigError
from ..files import holds, location_problem, same_file_key
from .jobs import MANIFEST, Job, done_outputs, read_jobs

LARGE_TFLOP = 1000.0



def plan_jobs(args, cfg) -> list[Job]:
    """The jobs of this run, decided once (on rank 0): invalid, already done, or to run.

    Every place the run writes is checked here, before any weights load: it can be made and written,
    it is not another output of the run (nor the manifest), and it does not exist yet (without --overwrite).
    """
    problem = encoder_problem()
    if problem is not None:
        raise ConfigError(f"--output: {problem}")
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
        frames = dict(paths).get("--save-frames")
        if frames is not None:
            held = next(((flag, path) for flag, path in paths if flag != "--save-frames" and holds(frames, path)), None)
            if held is not None:
                raise ConfigError(_frames_hold_message(frames, f"the {held[0]} {_shown(held[1])}"))
        for flag, path in paths:
            if flag != "--checkpoint-dir" and _exists(path) and not args.overwrite:
                raise ConfigError(f"{flag}: {path} already exists; pass --overwrite to replace it")
        return [job]
    _check_output_dir(args.output_dir)
    jobs = read_jobs(args.jobs, cfg, args.output_dir)
    done = done_outputs(args.output_dir) if args.resume else set()
    held = _frames_holding(jobs, args)
    for job in jobs:
        if job.error is not None:
            continue
        if job.relative in done:
            job.done = True
            continue
        outputs = _outputs(job, args)
        if args.resume and _complete_unrecorded(job, outputs):
            job.done = job.unrecorded = True
            continue
        problem = held.get(job.index) or _frames_link(job, args)
        problem = problem or next((f"{_key(flag)}: {_shown(path)} {problem}" for flag, path in outputs
                        if (problem := location_problem(path, folder=flag == "--save-frames")) is not None), None)
        existing = [(flag, path) for flag, path in outputs if _exists(path)] if problem is None else []
        if problem is None and existing and not args.overwrite:
            flag, path = existing[0]
            problem = f"{_key(flag)}: {path} already exists; pass --overwrite to replace it"
        if problem is not None:
            job.error = problem
            job.config = None
    return jobs


def encoder_problem() -> str | None:
    """Why this machine cannot write an mp4 (no imageio-ffmpeg, or no ffmpeg binary for it), or None:
    asked before any weights load, so that the run does not fail at its first frame."""
    try:
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError) as err:
        return (f"writing the mp4 needs ffmpeg through the imageio-ffmpeg package ({type(err).__name__}: {err}); "
                "pip install imageio-ffmpeg")
    return None


def _frames_hold_message(frames: Path, what: str) -> str:
    # --overwrite is not the way out: replacing the frames folder would delete what it holds
    return (f"--save-frames: {_shown(frames)} would hold {what}, which replacing the frames folder would delete; "
            "choose a --save-frames folder that holds no other output of the run")


def _frames_holding(jobs: list[Job], args) -> dict[int, str]:
    """Jobs (by line) whose frames folder `<--save-frames>/<name>` is or holds another output of the batch:
    any job's output or latents (done or not, valid or not) or --output-dir with its manifest."""
    if args.save_frames is None:
        return {}
    frames = {same_file_key(args.save_frames / job.name): job for job in jobs if job.config is not None}
    if not frames:
        return {}
    others = [(f"the manifest {_shown(args.output_dir / MANIFEST)}", args.output_dir / MANIFEST)]
    for job in jobs:
        others.append((f"line {job.index}'s output {_shown(job.output)}", job.output))
        if job.config is not None and job.config.save_latents:
            others.append((f"line {job.index}'s save_latents {_shown(job.config.save_latents)}",
                           Path(job.config.save_latents)))
    problems: dict[int, str] = {}
    for what, path in others:
        key = Path(same_file_key(path))
        # every folder above the output (and the output itself) that is some job's frames folder
        for candidate in (key, *key.parents):
            job = frames.get(str(candidate))
            if job is not None and job.index not in problems:
                problems[job.index] = _frames_hold_message(args.save_frames / job.name, what)
    return problems


def _complete_unrecorded(job: Job, outputs: list[tuple[str, Path]]) -> bool:
    """--resume: every output of the job is there though the manifest does not record it done: a run
    stopped between renaming the mp4 (written last, atomically) and its manifest line."""
    return all(path.is_file() if flag != "--save-frames" else _exists(path) for flag, path in outputs)


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


def check_model(cfg, device_type: str = "cpu", keep_tokenizer: bool = False):
    """This node's model folder has every component, whole (a hub id is downloaded here), and the
    model-level settings fit it and this device. Returns the (first) transformer's WanConfig.
    `keep_tokenizer`: this rank encodes the prompts later, and takes the tokenizer read here
    (`wan.text.load_tokenizer`) instead of reading it again."""
    import re

    from ..config import ATTENTION_BACKENDS, CPU_ATTENTION_BACKENDS
    from ..pipeline.denoise import block_scheduler, make_scheduler
    from ..wan.model import WanConfig
    from ..wan.modelcheck import check_model_folder
    from ..wan.text import load_tokenizer
    from ..wan.weights import ModelError, resolve_model

    folder = check_model_folder(resolve_model(cfg.model))
    try:
        block_scheduler(make_scheduler(cfg.scheduler, cfg.flow_shift, cfg.num_inference_steps,
                                       folder.path / "scheduler"))
    except Exception as err:  # diffusers' own checks of a config it accepts as JSON, and UniPC's settings
        raise ModelError(f"{folder.path / 'scheduler'}: cannot make the {cfg.scheduler} scheduler "
                              f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    try:
        load_tokenizer(folder.path / "tokenizer", keep=keep_tokenizer)
    except Exception as err:  # a tokenizer folder transformers cannot read, in whatever way
        raise ModelError(f"{folder.path / 'tokenizer'}: cannot load the tokenizer "
                              f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    wan = WanConfig.from_json(folder.experts[0] / "config.json")
    if cfg.loras:
        from ..wan.lora import check_loras

        check_loras(cfg.loras, [WanConfig.from_json(f / "config.json") for f in folder.experts])
    # DeepSpeed splits the layers (embedding, one per transformer block, head) by the partition method.
    names = ["WanEmbedLayer"] + ["WanBlockLayer"] * wan.num_layers + ["WanHeadLayer"]
    method = cfg.partition_method
    if method.lower().startswith("type:"):  # DeepSpeed fails (a traceback) when the regex matches no layer
        pattern = re.compile(method[len("type:"):], re.IGNORECASE)
        if not any(pattern.search(name) for name in names):
            raise ConfigError(f"dualparal.partition_method: {method!r} matches none of the layer classes "
                              f"({', '.join(sorted(set(names)))})")
    if cfg.first_stage_vae_layers > wan.num_layers:  # more would turn the split between stages around
        raise ConfigError(f"dualparal.first_stage_vae_layers: {cfg.first_stage_vae_layers} is more than the model's "
                          f"{wan.num_layers} transformer blocks")
    backend = cfg.attention_backend
    if device_type == "cpu" and backend is not None and backend not in CPU_ATTENTION_BACKENDS:
        gpu_only = [b for b in ATTENTION_BACKENDS if b not in CPU_ATTENTION_BACKENDS]
        raise ConfigError(f"dualparal.attention_backend: {backend!r} needs a GPU ({', '.join(gpu_only)} do); "
                          f"on CPU use {', '.join(CPU_ATTENTION_BACKENDS)} or null")
    if backend in BACKEND_MODULES and not _importable(BACKEND_MODULES[backend][0]):
        module, install = BACKEND_MODULES[backend]
        raise ConfigError(f"dualparal.attention_backend: {backend!r} needs the module {module} ({install}), "
                          f"which is not installed")
    return wan


# the module each attention backend imports, and what installs it (diffusers fails later, with a traceback)
BACKEND_MODULES = {
    "flash": ("flash_attn", "pip install flash-attn"),
    "_flash_3": ("flash_attn_interface", "FlashAttention 3, built from its hopper/ folder"),
    "sage": ("sageattention", "pip install sageattention"),
    "xformers": ("xformers", "pip install xformers"),
    "flash_4": ("flash_attn.cute", "FlashAttention 4: pip install flash-attn-4 'nvidia-cutlass-dsl[cu13]' for CUDA 13"),
}


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # its parent package is missing
        return False


def check_work(args, jobs: list[Job], wan, device_type: str) -> list[tuple[int, str]]:
    """Refuses (one line) a job whose clip cannot be continued or that cannot fit the device; returns what
    each other job costs, as (log level, line) for rank 0 to say once every check has passed."""
    from ..pipeline.clip import clip_problem
    from ..pipeline.estimate import device_memory, estimate, refusal, rotary_problem
    from ..pipeline.image import image_input, job_problem, read_vae_config, spatial_factor
    from ..wan.modelcheck import read_json
    from ..wan.weights import resolve_model

    memory = device_memory(device_type)
    costs = []
    schedules: dict[tuple, str | None] = {}
    configs = [job.config for job in jobs if job.config is not None]
    if configs:  # the model is the same for every job (a model-level setting)
        model_path = resolve_model(configs[0].model)
        index = read_json(model_path / "model_index.json") if (model_path / "model_index.json").is_file() else {}
        spatial, mode = spatial_factor(read_vae_config(model_path)), image_input(model_path, wan, index)
    for job in jobs:
        if job.config is None or job.done:
            continue
        cfg = job.config
        clip_problem_ = None if cfg.continue_from is None else clip_problem(
            cfg, wan.out_channels, spatial, image_model=mode is not None and mode.mode == "channels")
        if clip_problem_ is not None:
            if args.jobs is None:
                raise ConfigError(f"dualparal.continue_from: {clip_problem_}")
            job.error, job.config = f"continue_from: {clip_problem_}", None
            continue
        problem = job_problem(cfg, mode, spatial, wan.patch_size)
        if problem is not None:
            field, why = problem
            if args.jobs is None:
                raise ConfigError(f"--{field}: {why}")
            job.error, job.config = f"{field}: {why}", None
            continue
        key = (cfg.scheduler, cfg.flow_shift, cfg.num_inference_steps, cfg.model)
        if key not in schedules:
            schedules[key] = scheduler_problem(cfg)
        if schedules[key] is not None:
            if args.jobs is None:
                raise ConfigError(f"--steps/--scheduler/--flow-shift: {schedules[key]}")
            job.error, job.config = f"num_inference_steps/scheduler/flow_shift: {schedules[key]}", None
            continue
        rotary = rotary_problem(cfg, wan, spatial)
        if rotary is not None:
            fields, message = rotary
            if args.jobs is None:
                flags = {field: flag for flag, field in FLAGS.items()}
                raise ConfigError("/".join("--" + flags[f].replace("_", "-") for f in fields) + ": " + message)
            job.error, job.config = "/".join(fields) + ": " + message, None
            continue
        image = mode if cfg.image else None
        work = estimate(job.config, wan, spatial, image.clip_tokens if image else 0,
                        image is not None and image.mode == "first_frame")
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
    from ..config import TEMPORAL_FACTOR
    from ..pipeline.prompts import prompt_plan

    return [f"prompts[{i}] (from_frame {cfg.prompts[i].from_frame}) holds no block's middle frame, so no block takes "
            f"its prompt; make it at least a block ({TEMPORAL_FACTOR * cfg.block_size} video frames) long"
            for i in prompt_plan(cfg).unused]


def scheduler_problem(cfg) -> str | None:
    """Why a job's scheduler cannot take its steps, found by running them on a one-value latent before any
    work starts (about a millisecond a step); None if it can. On several stages a scheduler that fails
    in the middle of a generation ends the whole run, since the other stages wait in lockstep. (diffusers'
    UniPC failed at the last step from about 334 steps at flow_shift 3; the block scheduler, which counts
    its steps instead of looking them up among repeating timesteps, takes them.)"""
    import torch

    from ..pipeline.denoise import block_scheduler, make_scheduler
    from ..wan.weights import resolve_model

    steps = cfg.num_inference_steps
    try:
        scheduler = block_scheduler(make_scheduler(cfg.scheduler, cfg.flow_shift, steps,
                                                   resolve_model(cfg.model) / "scheduler"))
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
    from ..output.checkpoint import Checkpoints
    from ..pipeline.clip import job_timeline
    from ..wan.weights import resolve_model

    timeline = job_timeline(cfg)
    return Checkpoints.open(args.checkpoint_dir, args.checkpoint_every, cfg, resolve_model(cfg.model),
                            timeline.num_iterations)

