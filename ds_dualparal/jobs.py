"""Batch jobs: a JSON Lines file of prompts and per-job settings, and the manifest of what ran.

A bad line becomes a failed job with its error; the other jobs still run. Outputs stay inside the
output folder. The manifest (`manifest.jsonl` in the output folder) gets one line per finished or
failed job, appended whole, so several replicas can share it and `--resume` can skip done jobs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ConfigError, DualParalConfig

MANIFEST = "manifest.jsonl"
# Settings of the loaded model, the same for every job of a run.
MODEL_FIELDS = ("model", "dtype", "partition_method", "pipeline_stages", "attention_backend", "comm_timeout_s")
ALIASES = {"frames": "num_frames", "steps": "num_inference_steps", "guidance": "guidance_scale"}


@dataclass
class Job:
    index: int
    name: str
    output: Path
    config: DualParalConfig | None = None  # None when the line is invalid
    error: str | None = None
    extra: dict = field(default_factory=dict)


def _inside(output_dir: Path, relative: str) -> Path:
    path = Path(relative)
    if path.is_absolute() or ".." in path.parts:
        raise ConfigError(f"output: {relative!r} must be a relative path inside --output-dir")
    if path.suffix.lower() != ".mp4":
        raise ConfigError(f"output: {relative!r} must end in .mp4")
    return output_dir / path


def parse_job(index: int, line: str, base: DualParalConfig, output_dir: Path) -> Job:
    """One jobs-file line -> a Job; an invalid line gives a Job with `error` set (never raises)."""
    name = f"job_{index:04d}"
    output = output_dir / f"{name}.mp4"
    try:
        try:
            entry: Any = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"invalid JSON at column {err.colno}: {err.msg}") from None
        if not isinstance(entry, dict):
            raise ConfigError(f"each line must be a JSON object, got {type(entry).__name__}")
        entry = {ALIASES.get(k, k): v for k, v in entry.items()}
        if "name" in entry:
            if not isinstance(entry["name"], str) or not entry["name"]:
                raise ConfigError("name: must be a non-empty string")
            name = entry.pop("name")
        if "output" in entry:
            if not isinstance(entry["output"], str) or not entry["output"]:
                raise ConfigError("output: must be a non-empty string")
            output = _inside(output_dir, entry.pop("output"))
        fixed = [k for k in entry if k in MODEL_FIELDS]
        if fixed:
            raise ConfigError(f"{fixed[0]}: is a setting of the whole run and cannot change per job")
        config = base.with_overrides(**entry, output=str(output))
        return Job(index, name, output, config)
    except ConfigError as err:
        return Job(index, name, output, error=str(err).replace("dualparal.", ""))


def read_jobs(path: Path, base: DualParalConfig, output_dir: Path) -> list[Job]:
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"--jobs: cannot read {path}: {err}") from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        raise ConfigError(f"--jobs: {path} holds no jobs")
    jobs = [parse_job(n, line, base, output_dir) for n, line in lines]
    seen: dict[Path, int] = {}
    for job in jobs:
        if job.error is None and job.output in seen:
            job.error = f"output: {job.output.name} is also the output of line {seen[job.output]}"
            job.config = None
        seen.setdefault(job.output, job.index)
    return jobs


def done_outputs(output_dir: Path) -> set[str]:
    """Outputs that the manifest records as done and that exist."""
    manifest = output_dir / MANIFEST
    if not manifest.is_file():
        return set()
    done = set()
    for line in manifest.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a killed run
        if isinstance(record, dict) and record.get("status") == "done" and Path(str(record.get("output"))).is_file():
            done.add(str(record["output"]))
    return done


def record(output_dir: Path, entry: dict) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(entry, sort_keys=True) + "\n").encode()
    fd = os.open(output_dir / MANIFEST, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
