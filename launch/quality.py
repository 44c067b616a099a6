"""Quality benchmark for long videos: DualParal at several (block size, context) settings and both noise
modes against the whole-sequence baseline (diffusers' WanPipeline), on prompts of the toy world
(`ds_dualparal/toy/toyvideo.py`), scored with `ds_dualparal/toy/quality.py`. CPU, single process.

    python launch/quality.py                                   # the default sweep on the embedded tiny model
    python launch/quality.py --model path/to/tiny-wan --out outputs/quality.json

Every video of a prompt and seed starts from the same seed, prompt, steps, guidance and scheduler
(`--config`'s, default ds_configs/tiny.json). DualParal videos come from the single-process reference
(`generation.reference_latents`, bit-identical to the multi-stage engine), the baseline from
`WanPipeline` on the same model folder (up to `--baseline-frames`); both are decoded by the model's VAE
the same way (`video.StreamingDecoder`, `video.to_uint8_frames`). The baseline has no blocks: it is scored
at the block boundaries each DualParal setting would have (one table row per setting), which shows what
the seam and motion ratios read on a video without seams.

`--workers N` generates N videos at once (processes; `--threads` torch threads each). Prints one markdown
table (mean ± standard error over prompts x seeds, and how many standard errors apart the seam ratios
without and with context are) and writes every row of every video, with all
metrics, to `--out` (JSON, written atomically). `seconds` is the wall time from settings to latents on
this machine (model load, text encoding and denoising; the VAE decode is `decode_seconds`, apart).

The default sweep, 3 prompts x 2 seeds x (4 settings x 2 noise modes + the baseline) = 54 videos of 161
frames at 64x64 with 20 steps, took 811 s on one CPU thread with the embedded trained model (on a busy
2-core machine; 337 s with the earlier random-weight model): ~6 s a video to decode, 3-12 s to generate
(B=2 the slowest: 20 blocks).
"""

from __future__ import annotations

import argparse
import json
import os
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("quality")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "ds_configs" / "tiny.json"
# (colour, shape, motion, background): different colours, shapes, motions and backgrounds. No "turns": a
# turning shape's centroid stays put, which leaves the motion-jump ratio nothing to measure.
PROMPTS = (
    ("red", "circle", "moves sideways", "striped"),
    ("blue", "square", "bounces", "checkered"),
    ("yellow", "triangle", "moves up and down", "cloudy"),
)
DEFAULT_SETTINGS = "2:1,4:0,4:2,8:4"  # block size:context, latent frames; 4:0 is DualParal without context
NOISE_MODES = ("coordinated", "independent")
METRICS = ("adherence", "seam_ratio", "motion_jump_ratio", "drift")  # logged per video
# The table's columns, in order: (metric, header).
COLUMNS = (
    ("adherence", "adherence"), ("adherence_first", "1st s"), ("adherence_middle", "mid s"),
    ("adherence_last", "last s"), ("shape_match", "shape"), ("motion_match", "motion"),
    ("background_match", "background"), ("seam_ratio", "seam ratio"), ("motion_jump_ratio", "motion-jump ratio"),
    ("drift", "drift"),
)


@dataclass(frozen=True)
class Setting:
    block_size: int
    context: int

    @property
    def label(self) -> str:
        return f"B={self.block_size} c={self.context}"


def _settings(text: str) -> list[Setting]:
    settings = []
    for item in text.split(","):
        try:
            block, context = (int(part) for part in item.split(":"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is not BLOCK:CONTEXT (two integers, e.g. 4:2)") from None
        if block < 1 or not 0 <= context <= block:
            raise argparse.ArgumentTypeError(f"{item!r}: needs block size >= 1 and 0 <= context <= block size")
        settings.append(Setting(block, context))
    if len(set(settings)) != len(settings):
        raise argparse.ArgumentTypeError(f"{text!r} names a setting twice")
    return settings


def _int_list(text: str) -> list[int]:
    try:
        values = [int(item) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if any(v < 0 for v in values) or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"{text!r}: seeds must be distinct integers >= 0")
    return values


def _noise_modes(text: str) -> list[str]:
    modes = text.split(",")
    bad = [m for m in modes if m not in NOISE_MODES]
    if bad or len(set(modes)) != len(modes):
        raise argparse.ArgumentTypeError(f"{text!r}: a comma-separated list of distinct {', '.join(NOISE_MODES)}")
    return modes


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _video_frames(text: str) -> int:
    value = _positive(text)
    if (value - 1) % 4:
        low = value - (value - 1) % 4
        raise argparse.ArgumentTypeError(f"{value} is not 4k+1 (nearest: {low} or {low + 4})")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launch/quality.py", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=None, help="diffusers Wan folder; default: the embedded tiny model")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG),
                        help="config whose dualparal section gives size, guidance, scheduler, flow shift, dtype, fps")
    parser.add_argument("--frames", type=_video_frames, default=161, help="video frames of every video (4k+1)")
    parser.add_argument("--steps", type=_positive, default=20, help="denoising steps (per block for DualParal)")
    parser.add_argument("--seeds", type=_int_list, default=[0, 1], help="comma-separated seeds")
    parser.add_argument("--prompts", type=_positive, default=len(PROMPTS),
                        help=f"how many of the {len(PROMPTS)} fixed toy prompts to use (the first N)")
    parser.add_argument("--settings", type=_settings, default=_settings(DEFAULT_SETTINGS),
                        help="comma-separated DualParal BLOCK:CONTEXT settings, in latent frames "
                             f"(default {DEFAULT_SETTINGS})")
    parser.add_argument("--noise", type=_noise_modes, default=list(NOISE_MODES),
                        help="comma-separated noise modes to run each setting in")
    parser.add_argument("--baseline-frames", type=int, default=None,
                        help="frames of the WanPipeline baseline (4k+1; 0: no baseline); default: --frames")
    parser.add_argument("--fps", type=_positive, default=None,
                        help="frames per second, for drift's first and last second; default: the config's")
    parser.add_argument("--threads", type=_positive, default=1, help="torch CPU threads per process")
    parser.add_argument("--workers", type=_positive, default=1, help="processes that generate videos at once")
    parser.add_argument("--out", default="outputs/quality.json", help="JSON with every video's results")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.prompts > len(PROMPTS):
        parser.error(f"--prompts: at most {len(PROMPTS)}, got {args.prompts}")
    if args.baseline_frames is None:
        args.baseline_frames = args.frames
    if args.baseline_frames and (args.baseline_frames < 1 or (args.baseline_frames - 1) % 4):
        parser.error(f"--baseline-frames: {args.baseline_frames} is neither 0 nor 4k+1")
    if args.baseline_frames > args.frames:
        parser.error(f"--baseline-frames: {args.baseline_frames} is more than --frames ({args.frames})")
    from ds_dualparal.config import ConfigError, load_config
    from ds_dualparal.files import location_problem
    from ds_dualparal.wan.weights import ModelError, ModelFolder, resolve_model

    problem = location_problem(args.out)
    if problem:
        parser.error(f"--out {args.out} {problem}")
    if os.path.lexists(args.out) and not args.overwrite:
        parser.error(f"--out {args.out} already exists; pass --overwrite to replace it")
    try:
        base = load_config(args.config).dualparal
        if args.model is not None:
            base = base.with_overrides(model=args.model)
        args.jobs = make_jobs(args, base)
        args.folder = ModelFolder(resolve_model(base.model)).path
    except (ConfigError, ModelError) as err:
        parser.error(str(err))
    args.fps = args.fps or base.fps
    args.vae_dtype = base.vae_dtype
    return args


@dataclass
class Job:
    """One video to generate: its method, config and where its prompt came from."""

    method: str  # "dualparal" or "baseline"
    cfg: object  # DualParalConfig
    prompt_index: int
    setting: Setting | None  # None: the baseline
    row: str  # the table row it belongs to (the baseline is scored for every setting's row)


def make_jobs(args, base) -> list[Job]:
    """Every video of the sweep, each config validated before anything runs (a ConfigError says which)."""
    from ds_dualparal.toy.toyvideo import prompt

    jobs = []
    for p, words in enumerate(PROMPTS[: args.prompts]):
        for seed in args.seeds:
            common = dict(prompt=prompt(*words), seed=seed, num_frames=args.frames,
                          num_inference_steps=args.steps)
            for setting in args.settings:
                for noise in args.noise:
                    cfg = base.with_overrides(**common, block_size=setting.block_size, context=setting.context,
                                              noise=noise)
                    jobs.append(Job("dualparal", cfg, p, setting, f"DualParal {setting.label} {noise}"))
            if args.baseline_frames:
                latent = (args.baseline_frames - 1) // 4 + 1  # one block holds the whole video
                common["num_frames"] = args.baseline_frames
                cfg = base.with_overrides(**common, block_size=latent, context=0)
                jobs.append(Job("baseline", cfg, p, None, "baseline"))
    return jobs


def quiet_libraries() -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()


def dualparal_latents(cfg):
    from ds_dualparal.pipeline.generation import reference_latents

    return reference_latents(cfg)


def baseline_latents(cfg, folder: Path):
    """WanPipeline on the model folder: the same prompt, steps, guidance, scheduler (and flow shift) and
    seed (its initial latents are the coordinated noise pool of one block), latents out."""
    import torch
    from diffusers import WanPipeline

    from ds_dualparal.pipeline.denoise import make_scheduler
    from ds_dualparal.pipeline.generation import DTYPES

    pipe = WanPipeline.from_pretrained(folder, dtype=DTYPES[cfg.dtype])
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler(cfg.scheduler, cfg.flow_shift, cfg.num_inference_steps, folder / "scheduler")
    with torch.no_grad():
        return pipe(
            prompt=cfg.prompt, negative_prompt=cfg.negative_prompt, height=cfg.height, width=cfg.width,
            num_frames=cfg.num_frames, num_inference_steps=cfg.num_inference_steps,
            guidance_scale=cfg.guidance_scale, guidance_scale_2=cfg.guidance_scale_2,
            generator=torch.Generator().manual_seed(cfg.seed), output_type="latent",
        ).frames


def decode(vae, latents):
    """Normalised latents (1, C, f, h, w) -> uint8 frames (F, H, W, 3), as the project writes its mp4s."""
    from ds_dualparal.output.video import StreamingDecoder, to_uint8_frames

    return to_uint8_frames(StreamingDecoder(vae).decode(latents))


def load_vae(folder: Path, dtype: str):
    from diffusers import AutoencoderKLWan

    from ds_dualparal.pipeline.generation import DTYPES

    return AutoencoderKLWan.from_pretrained(folder / "vae", dtype=DTYPES[dtype], use_safetensors=True).eval()


_VAE = {}  # per process: the model's VAE, loaded once


def score_job(job: Job, folder: Path, vae_dtype: str, fps: int, settings: list[Setting], threads: int) -> list[dict]:
    """Generates, decodes and scores one job; one JSON-ready dict per table row it belongs to."""
    import torch

    from ds_dualparal.toy import quality

    torch.set_num_threads(threads)
    if folder not in _VAE:
        quiet_libraries()
        _VAE[folder] = load_vae(folder, vae_dtype)
    cfg = job.cfg
    colour, shape, motion, background = PROMPTS[job.prompt_index]
    started = time.perf_counter()
    latents = dualparal_latents(cfg) if job.method == "dualparal" else baseline_latents(cfg, folder)
    seconds = time.perf_counter() - started
    started = time.perf_counter()
    frames = decode(_VAE[folder], latents)
    decode_seconds = time.perf_counter() - started
    video = dict(method=job.method, prompt=cfg.prompt, colour=colour, shape=shape, motion=motion,
                 background=background, seed=cfg.seed, frames=len(frames), steps=cfg.num_inference_steps,
                 fps=fps, seconds=round(seconds, 3), decode_seconds=round(decode_seconds, 3))
    # the baseline is scored at the block boundaries of every setting; a DualParal video at its own
    scored_as = [job.setting] if job.setting is not None else settings
    rows = []
    for setting in scored_as:
        boundaries = quality.block_boundaries(len(frames), setting.block_size, setting.context)
        scores = quality.score_video(frames, colour, boundaries, fps, shape, motion, background)
        row = job.row if job.setting is not None else f"baseline (at {setting.label}'s boundaries)"
        rows.append(dict(row=row, **video, block_size=setting.block_size, context=setting.context,
                         noise=cfg.noise if job.method == "dualparal" else None, boundaries=boundaries, **scores))
    return rows


def run(args) -> list[dict]:
    """Every job of the sweep, on `args.workers` processes; the rows in job order."""
    from concurrent.futures import ProcessPoolExecutor

    work = [(job, args.folder, args.vae_dtype, args.fps, args.settings, args.threads) for job in args.jobs]
    rows = []

    def report(n, job, mine):
        rows.extend(mine)
        shown = " ".join(f"{m} {_fmt(mine[-1][m])}" for m in METRICS)
        log.info("video %d/%d: %s, %r seed %d: %.1fs (+%.1fs decode); %s", n, len(args.jobs), job.row,
                 job.cfg.prompt, job.cfg.seed, mine[-1]["seconds"], mine[-1]["decode_seconds"], shown)

    if args.workers == 1:
        for n, item in enumerate(work, 1):
            report(n, item[0], score_job(*item))
        return rows
    import multiprocessing

    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(score_job, *item) for item in work]
        for n, (item, future) in enumerate(zip(work, futures), 1):
            report(n, item[0], future.result())
    return rows


def _fmt(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _values(values) -> list[float]:
    return [v for v in values if v is not None and not math.isnan(v)]


def _mean(values) -> float | None:
    values = _values(values)
    return sum(values) / len(values) if values else None


def _standard_error(values) -> float | None:
    """The standard error of the mean (sample standard deviation / sqrt(n)); None under two values."""
    values = _values(values)
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))


def summary(rows: list[dict]) -> list[dict]:
    """Per table row (in first-seen order): the mean and standard error (`{metric}_se`) of each metric over
    its videos, and the mean seconds."""
    order = list(dict.fromkeys(r["row"] for r in rows))
    table = []
    for name in order:
        mine = [r for r in rows if r["row"] == name]
        entry = {"row": name, "videos": len(mine), "block_size": mine[0]["block_size"],
                 "context": mine[0]["context"], "noise": mine[0]["noise"]}
        for key, _ in COLUMNS:
            entry[key] = _mean(r.get(key) for r in mine)
            entry[key + "_se"] = _standard_error(r.get(key) for r in mine)
        entry["seconds"] = _mean(r["seconds"] for r in mine)
        table.append(entry)
    return table


def separation(a: dict, b: dict, metric: str) -> float | None:
    """(mean of a - mean of b) in standard errors of the difference (summary entries); None without them."""
    if a[metric] is None or b[metric] is None or not a[metric + "_se"] or not b[metric + "_se"]:
        return None
    return (a[metric] - b[metric]) / math.sqrt(a[metric + "_se"] ** 2 + b[metric + "_se"] ** 2)


def seam_separations(table: list[dict]) -> list[dict]:
    """Each DualParal row without context against each with context of the same noise mode: how many
    standard errors apart their seam ratios are (positive: the no-context seams are stronger)."""
    dualparal = [e for e in table if e["noise"] is not None]
    return [{"without": a["row"], "with": b["row"], "seam_ratio_z": separation(a, b, "seam_ratio")}
            for a in dualparal if a["context"] == 0
            for b in dualparal if b["context"] > 0 and b["noise"] == a["noise"]]


def _cell(entry: dict, metric: str) -> str:
    se = entry[metric + "_se"]
    return _fmt(entry[metric]) + ("" if se is None else f" ±{se:.2f}")


def markdown(table: list[dict]) -> str:
    """The table (mean ±standard error over videos) and the seam separations."""
    lines = ["| method / setting | videos | " + " | ".join(h for _, h in COLUMNS) + " | seconds |",
             "|---|---|" + "---|" * len(COLUMNS) + "---|"]
    for e in table:
        cells = [e["row"], str(e["videos"]), *(_cell(e, m) for m, _ in COLUMNS), _fmt(e["seconds"], 1)]
        lines.append("| " + " | ".join(cells) + " |")
    for s in seam_separations(table):
        lines.append(f"\nseam ratio, {s['without']} vs {s['with']}: {_fmt(s['seam_ratio_z'], 1)} standard errors apart")
    return "\n".join(lines)


def write_json(path: str, args, rows: list[dict], table: list[dict], seconds: float) -> None:
    from ds_dualparal.files import atomic_output

    document = dict(
        model=str(args.folder), config=args.config, frames=args.frames, steps=args.steps,
        seeds=args.seeds, prompts=list(dict.fromkeys(r["prompt"] for r in rows)),
        settings=[s.label for s in args.settings], noise=args.noise, baseline_frames=args.baseline_frames,
        fps=args.fps, threads=args.threads, workers=args.workers, total_seconds=round(seconds, 1), summary=table,
        seam_separations=seam_separations(table), videos=rows,
    )
    text = json.dumps(document, indent=1, allow_nan=False) + "\n"
    with atomic_output(path, overwrite=args.overwrite) as partial:
        partial.write_text(text)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    started = time.perf_counter()
    log.info("%d videos: %d prompt(s) x %d seed(s) x (%d setting(s) x %d noise mode(s)%s), %d frames, %d steps",
             len(args.jobs), args.prompts, len(args.seeds), len(args.settings), len(args.noise),
             " + baseline" if args.baseline_frames else "", args.frames, args.steps)
    rows = run(args)
    table = summary(rows)
    seconds = time.perf_counter() - started
    print(markdown(table))
    write_json(args.out, args, rows, table, seconds)
    log.info("wrote %s (%d rows) in %.1fs", args.out, len(rows), seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
