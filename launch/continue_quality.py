"""Quality of the join when a clip is continued (`--continue-from`, docs/continue-a-clip.md), against the
seams inside one video, on the toy world's prompts, scored with `ds_dualparal/toy/quality.py`. CPU,
single process.

    python launch/continue_quality.py                       # the embedded tiny model, 41 + 40 frames
    python launch/continue_quality.py --clip-frames 41 --frames 81 --steps 10 --seeds 0   # BENCHMARKS.md's

For each prompt and seed: the tiny model's own video of `--clip-frames` frames is the clip; it is
continued to `--frames` frames from its latents and from its mp4 (x264, as `generate.py` writes it,
then encoded by the model's VAE); and the whole `--frames` video is generated at once, the same prompt,
seed and settings. Every video comes from the single-process reference (`generation.reference_latents`,
bit-identical to the engine on any number of stages) and is decoded like the engine's mp4 (one causal
decode of all its latents; a continued mp4 clip's own frames replace the decode of the clip's part).

Scores (means over prompts x seeds): `seam ratio` (quality.seam_ratio: the mean frame change at the
given frames over the mean at the other latent transitions; 1.0 = no seam) and `motion-jump ratio` (the
same for the object's centroid), at the join (the first new frame) or at the block boundaries, and the
VAE round trip of the mp4 clip: its latents (encoded) against the clip's own (relative L2, max |diff|),
those latents decoded against the mp4's frames (mean |diff| in levels of 255), and the mp4's frames
against the clip's decoded frames (the x264 encode alone).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("continue_quality")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))

from quality import PROMPTS, load_vae, quiet_libraries  # noqa: E402

ROWS = (
    ("one video", "block boundaries"),
    ("one video", "the join's frame"),
    ("continued latents", "the join"),
    ("continued latents", "new block boundaries"),
    ("continued mp4", "the join"),
)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1")
    return value


def _video_frames(text: str) -> int:
    value = _positive(text)
    if (value - 1) % 4:
        raise argparse.ArgumentTypeError(f"{value} is not 4k+1 (nearest: {value - (value - 1) % 4} or "
                                         f"{value - (value - 1) % 4 + 4})")
    return value


def _seeds(text: str) -> list[int]:
    try:
        return [int(item) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def _fmt(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launch/continue_quality.py", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=None, help="diffusers Wan folder; default: the embedded tiny model")
    parser.add_argument("--config", default=str(ROOT / "ds_configs" / "tiny.json"),
                        help="config whose dualparal section gives size, block size, context, guidance, scheduler")
    parser.add_argument("--clip-frames", type=_video_frames, default=41, help="video frames of the clip (4k+1)")
    parser.add_argument("--frames", type=_video_frames, default=81, help="video frames of the whole video (4k+1)")
    parser.add_argument("--steps", type=_positive, default=20, help="denoising steps per block")
    parser.add_argument("--seeds", type=_seeds, default=[0, 1], help="comma-separated seeds")
    parser.add_argument("--prompts", type=_positive, default=len(PROMPTS), help="how many of the toy prompts")
    parser.add_argument("--threads", type=_positive, default=1, help="torch CPU threads")
    parser.add_argument("--out", default="outputs/continue_quality.json", help="JSON with every video's scores")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.clip_frames >= args.frames:
        parser.error(f"--clip-frames ({args.clip_frames}) must be fewer than --frames ({args.frames})")
    if args.prompts > len(PROMPTS):
        parser.error(f"--prompts: at most {len(PROMPTS)}")
    from ds_dualparal.config import ConfigError, load_config
    from ds_dualparal.wan.weights import ModelError, ModelFolder, resolve_model

    try:
        args.base = load_config(args.config, dict(model=args.model, num_inference_steps=args.steps)).dualparal
        args.folder = ModelFolder(resolve_model(args.base.model)).path
    except (ConfigError, ModelError) as err:
        parser.error(str(err))
    return args


def frames_of(vae, latents, clip_frames=None):
    """The frames generate.py writes: one causal decode of all latents; `clip_frames` replace the clip's part."""
    from ds_dualparal.output.video import StreamingDecoder, to_uint8_frames

    frames = to_uint8_frames(StreamingDecoder(vae).decode(latents))
    if clip_frames is not None:
        frames[: len(clip_frames)] = clip_frames
    return frames


def score(frames, colour, boundaries) -> dict:
    from ds_dualparal.toy import quality

    return dict(seam_ratio=quality.seam_ratio(frames, boundaries),
                motion_jump_ratio=quality.motion_jump_ratio(frames, colour, boundaries))


def boundaries_of(cfg) -> list[int]:
    """Video frames that start a block of `cfg`'s timeline (its first block after a clip included)."""
    from ds_dualparal.config import TEMPORAL_FACTOR
    from ds_dualparal.pipeline.clip import job_timeline

    timeline = job_timeline(cfg)
    first = 0 if timeline.prefix else 1
    return [TEMPORAL_FACTOR * timeline.block_start(b) - (TEMPORAL_FACTOR - 1) for b in range(first, timeline.num_blocks)]


def run(args, work: Path) -> list[dict]:
    import torch
    from safetensors.torch import save_file

    from ds_dualparal.output.video import Mp4Writer
    from ds_dualparal.pipeline.clip import _read_video, encode_video
    from ds_dualparal.pipeline.generation import reference_latents
    from ds_dualparal.toy.toyvideo import prompt

    torch.set_num_threads(args.threads)
    quiet_libraries()
    vae = load_vae(args.folder, "float32")
    rows = []
    for p, (colour, shape, motion, background) in enumerate(PROMPTS[: args.prompts]):
        for seed in args.seeds:
            started = time.perf_counter()
            cfg = args.base.with_overrides(prompt=prompt(colour, shape, motion, background), seed=seed,
                                           num_frames=args.frames)
            whole = frames_of(vae, reference_latents(cfg))
            clip_latents = reference_latents(cfg.with_overrides(num_frames=args.clip_frames))
            clip_frames = frames_of(vae, clip_latents)
            latents_file, mp4_file = work / f"clip{p}_{seed}.safetensors", work / f"clip{p}_{seed}.mp4"
            save_file({"latents": clip_latents.contiguous()}, str(latents_file))
            with Mp4Writer(mp4_file, args.base.fps, overwrite=True) as writer:
                writer.append(clip_frames)
            from_latents = cfg.with_overrides(continue_from=str(latents_file))
            continued = reference_latents(from_latents)
            assert torch.equal(continued[:, :, : clip_latents.shape[2]], clip_latents)
            mp4_frames = _read_video(mp4_file)
            from_mp4 = reference_latents(cfg.with_overrides(continue_from=str(mp4_file)))
            round_trip = encode_video(vae, mp4_frames, "cpu")
            join = [args.clip_frames]
            new_blocks = boundaries_of(from_latents)
            assert new_blocks[0] == args.clip_frames
            scored = {
                ROWS[0]: score(whole, colour, boundaries_of(cfg)),
                ROWS[1]: score(whole, colour, join),
                ROWS[2]: score(frames_of(vae, continued), colour, join),
                ROWS[3]: score(frames_of(vae, continued), colour, new_blocks[1:]),
                ROWS[4]: score(frames_of(vae, from_mp4, mp4_frames), colour, join),
            }
            vae_round_trip = dict(
                latents_relative_l2=float((round_trip - clip_latents).norm() / clip_latents.norm()),
                latents_max_abs=float((round_trip - clip_latents).abs().max()),
                x264_mean_abs=float(abs(mp4_frames.astype(float) - clip_frames.astype(float)).mean()),
                frames_mean_abs=float(abs(frames_of(vae, round_trip).astype(float) - mp4_frames.astype(float)).mean()),
            )
            for (video, at), scores in scored.items():
                rows.append(dict(video=video, at=at, prompt=cfg.prompt, colour=colour, seed=seed, **scores,
                                 **(vae_round_trip if video == "continued mp4" else {})))
            log.info("%r seed %d: %.1fs; seam at the join %s (latents) %s (mp4), in one video %s", cfg.prompt, seed,
                     time.perf_counter() - started, _fmt(scored[ROWS[2]]["seam_ratio"]),
                     _fmt(scored[ROWS[4]]["seam_ratio"]), _fmt(scored[ROWS[0]]["seam_ratio"]))
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| video | scored at | videos | seam ratio | motion-jump ratio |", "|---|---|---|---|---|"]
    for video, at in ROWS:
        mine = [r for r in rows if (r["video"], r["at"]) == (video, at)]
        lines.append(f"| {video} | {at} | {len(mine)} | {_fmt(_mean(r['seam_ratio'] for r in mine))} | "
                     f"{_fmt(_mean(r['motion_jump_ratio'] for r in mine))} |")
    mp4 = [r for r in rows if r["video"] == "continued mp4"]
    lines.append("")
    lines.append(f"VAE round trip of the mp4 clip: its latents against the clip's own, relative L2 "
                 f"{_fmt(_mean(r['latents_relative_l2'] for r in mp4), 3)}, max |diff| "
                 f"{_fmt(max(r['latents_max_abs'] for r in mp4), 2)}; its latents decoded against its frames, mean |diff| "
                 f"{_fmt(_mean(r['frames_mean_abs'] for r in mp4), 2)} levels of 255; the mp4's frames against the "
                 f"clip's decoded frames (x264), {_fmt(_mean(r['x264_mean_abs'] for r in mp4), 2)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="continue-quality-") as work:
        rows = run(args, Path(work))
    seconds = time.perf_counter() - started
    table = markdown(rows)
    print(table)
    from ds_dualparal.files import atomic_output

    document = dict(config=args.config, model=str(args.folder), clip_frames=args.clip_frames, frames=args.frames,
                    steps=args.steps, seeds=args.seeds, total_seconds=round(seconds, 1), table=table, rows=rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(args.out, overwrite=True) as partial:
        partial.write_text(json.dumps(document, indent=1, allow_nan=False) + "\n")
    log.info("wrote %s in %.1fs", args.out, seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
