"""Batch jobs: a JSON Lines file of prompts and per-job settings, and the manifest of what ran.

A bad line becomes a failed job with its error; the other jobs still run. Outputs stay inside the
output folder. The manifest (`manifest.jsonl` in the output folder) gets one line per finished or
failed job, appended whole, so several replicas can share it and `--resume` can skip done jobs.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import FLAGS, MODEL_FIELDS, ConfigError, DualParalConfig
from ..files import (
    DuplicateKeyError,
    NotRegularFileError,
    append_line,
    is_temporary_name,
    name_length_problem,
    no_duplicate_keys,
    read_regular_file,
    same_file_key,
)

log = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
# A jobs line may use a setting's flag name for it, as on the command line (frames for num_frames).
ALIASES = {flag: field for flag, field in FLAGS.items() if flag != field}


@dataclass
class Job:
    index: int  # line number in the jobs file
    name: str
    output: Path
    config: DualParalConfig | None = None  # None when the line is invalid
    error: str | None = None
    done: bool = False  # --resume: the manifest records it done, so it is skipped
    unrecorded: bool = False  # --resume: done, but its manifest line was lost (the run stopped before it)
    relative: str = ""  # the output's path inside --output-dir, as the manifest records it


def _no_nul(key: str, text: str) -> None:
    # it would fail only when the file is opened, after the batch started
    if "\0" in text:
        raise ConfigError(f"{key}: {text!r} must not contain a NUL character")


def _is_unicode(text: str) -> bool:
    """False for lone surrogates, which JSON escapes allow and which the tokenizer refuses (TypeError)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _inside(output_dir: Path, key: str, relative: str, suffix: str | None = None) -> Path:
    _no_nul(key, relative)
    path = Path(relative)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise ConfigError(f"{key}: {relative!r} must be a relative path inside --output-dir")
    if suffix is not None and path.suffix.lower() != suffix:
        raise ConfigError(f"{key}: {relative!r} must end in {suffix}")
    too_long = name_length_problem(output_dir / path)
    if too_long is not None:
        raise ConfigError(f"{key}: {relative[:40]!r}... {too_long}")
    temporary = next((part for part in path.parts if is_temporary_name(part)), None)
    if temporary is not None:
        raise ConfigError(f"{key}: {relative!r} is named like a temporary file (.<name>.*.partial), "
                          "which writers delete; choose another name")
    if key == "save_latents" and path.parts[0].casefold() == MANIFEST:
        raise ConfigError(f"{key}: {relative!r} is the manifest of --output-dir")
    try:
        resolved = (output_dir / path).resolve()
        escapes = not resolved.is_relative_to(output_dir.resolve())
    except (OSError, RuntimeError):  # a link loop
        escapes = True
    if escapes:
        raise ConfigError(f"{key}: {relative!r} leads out of --output-dir through a symbolic link")
    return output_dir / path


def _string(entry: dict, key: str) -> str:
    value = entry.pop(key)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: must be a non-empty string")
    return value


def parse_job(index: int, line: str, base: DualParalConfig, output_dir: Path) -> Job:
    """One jobs-file line -> a Job; an invalid line gives a Job with `error` set (never raises).

    `output` and `save_latents` are relative paths inside `output_dir`; the output defaults to `<name>.mp4`.
    """
    name = f"job_{index:04d}"
    relative = f"{name}.mp4"
    try:
        try:
            entry: Any = json.loads(line, object_pairs_hook=no_duplicate_keys)
        except json.JSONDecodeError as err:
            raise ConfigError(f"invalid JSON at column {err.colno}: {err.msg}") from None
        except DuplicateKeyError as err:
            raise ConfigError(f"{err.key}: given twice") from None
        except RecursionError:
            raise ConfigError("invalid JSON: nested too deeply") from None
        except ValueError as err:  # e.g. an integer of more digits than Python converts
            raise ConfigError(f"invalid JSON: {str(err).splitlines()[0]}") from None
        if not isinstance(entry, dict):
            raise ConfigError(f"each line must be a JSON object, got {type(entry).__name__}")
        for alias, key in ALIASES.items():
            if alias in entry and key in entry:
                raise ConfigError(f"{alias}: given together with {key}, its long name")
        entry = {ALIASES.get(k, k): v for k, v in entry.items()}
        for key, value in entry.items():
            if isinstance(value, str) and not _is_unicode(value):
                raise ConfigError(f"{key}: holds a lone surrogate (\\ud800-\\udfff), which is not text")
        if "name" in entry:
            name = _string(entry, "name")
            _no_nul("name", name)
            if Path(name).name != name or name in (".", ".."):
                raise ConfigError(f"name: {name!r} must be a plain file name, without '/'")
            relative = f"{name}.mp4"
        if "output" in entry:
            relative = _string(entry, "output")
        output = _inside(output_dir, "output", relative, ".mp4")
        relative = Path(relative).as_posix()
        if "save_latents" in entry and entry["save_latents"] is not None:
            entry["save_latents"] = str(_inside(output_dir, "save_latents", _string(entry, "save_latents")))
        fixed = [k for k in entry if k in MODEL_FIELDS]
        if fixed:
            raise ConfigError(f"{fixed[0]}: is a setting of the whole run and cannot change per job")
        config = base.with_overrides(**{"save_latents": None, **entry, "output": str(output)})
        return Job(index, name, output, config, relative=relative)
    except ConfigError as err:
        return Job(index, name, output_dir / relative, error=str(err).replace("dualparal.", ""), relative=relative)


MAX_JOBS_FILE_BYTES = 64 * 2**20


def read_jobs(path: Path, base: DualParalConfig, output_dir: Path) -> list[Job]:
    """Every line of a jobs file as a Job; two jobs writing the same file make the later one fail.

    The same file means the same path after links are resolved, compared case-insensitively; two jobs
    of one name would share a frames folder (`--save-frames DIR/<name>`), so a name is used once too.
    """
    try:
        text = read_regular_file(path, MAX_JOBS_FILE_BYTES).decode("utf-8")
    except NotRegularFileError as err:
        raise ConfigError(f"--jobs: {err}") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ConfigError(f"--jobs: cannot read {path}: {getattr(err, 'strerror', None) or err}") from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        raise ConfigError(f"--jobs: {path} holds no jobs")
    jobs = [parse_job(n, line, base, output_dir) for n, line in lines]
    seen: dict[str, int] = {}
    names: dict[str, int] = {}
    for job in jobs:
        if job.error is not None:
            continue
        paths = [job.output] + ([Path(job.config.save_latents)] if job.config.save_latents else [])
        if len({same_file_key(p) for p in paths}) < len(paths):
            job.error = f"save_latents: {job.config.save_latents} is also this job's output"
        clash = next((p for p in paths if same_file_key(p) in seen), None)
        if clash is not None:
            job.error = f"output: {clash.relative_to(output_dir)} is also written by line {seen[same_file_key(clash)]}"
        elif job.name.casefold() in names:
            job.error = f"name: {job.name!r} is also the name of line {names[job.name.casefold()]}"
        if job.error is not None:
            job.config = None
            continue
        seen.update({same_file_key(p): job.index for p in paths})
        names[job.name.casefold()] = job.index
    return jobs


def done_outputs(output_dir: Path) -> set[str]:
    """Outputs (relative to `output_dir`) that the manifest records as done and that exist."""
    manifest = output_dir / MANIFEST
    if not manifest.is_file():
        return set()
    done = set()
    try:
        text = manifest.read_bytes().decode("utf-8", errors="replace")  # a torn line may cut a character
    except OSError:
        return set()
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a killed run
        if isinstance(entry, dict) and entry.get("status") == "done" and isinstance(entry.get("output"), str):
            if (output_dir / entry["output"]).is_file():
                done.add(entry["output"])
    return done


def record(output_dir: Path, entry: dict) -> bool:
    """Appends one manifest line whole (`files.append_line`: one write under a lock, after a newline if
    the file ends in a torn line), so that lines of concurrent replicas never interleave.

    A manifest that cannot be written (disk full, ...) is logged in one line and the batch goes on:
    returns False then.
    """
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        append_line(output_dir / MANIFEST, json.dumps(entry, sort_keys=True))
    except OSError as err:
        log.error("manifest %s: cannot record job %s: %s", output_dir / MANIFEST, entry.get("job"),
                  getattr(err, "strerror", None) or err)
        return False
    return True
