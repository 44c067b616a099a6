"""The command line of `launch/generate.py`: its flags, the config they override, and the mistakes
visible in the flags alone.

Every flag of a setting comes from the settings registry (`config.FLAGS`); a wrong value is refused
by the config's own validation, so a flag and a config field give the same one-line message.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Literal, get_args, get_origin

from ..config import FLAGS, ConfigError, DualParalConfig, load_config, tags


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
    """`PATH[:SCALE[:EXPERT]]` -> a `loras` entry; a suffix that is neither stays part of the path, and so
    does the whole text when it names an existing file (`b:0.5` is that file, not `b` at scale 0.5)."""
    entry = {"path": text}
    if os.path.isfile(text):
        return entry
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

