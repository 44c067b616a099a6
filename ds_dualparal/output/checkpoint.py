"""Checkpoint and resume of one long generation (`--checkpoint-dir DIR --checkpoint-every N`).

Every N iterations the first stage saves the state to continue from iteration i: all block-steps of
earlier iterations are applied and none of a later one (the schedule's `SaveCheckpoint`). A run of
the same command finds the newest complete checkpoint and every stage starts at iteration i; the
feature cache starts empty, which is exact (it never outlives an iteration). No pickle anywhere:
tensors go to safetensors, the rest to JSON.

    DIR/iter_000012/
        latents.safetensors     block_0000, block_0001, ...: every block's latents (fp32), final and
                                not yet started blocks too
        schedulers.safetensors  the tensors of the schedulers' states, named in state.json
        state.json              {"iteration": 12, "schedulers": {block: {attribute: value}}} for the
                                blocks in progress; a tensor is {"tensor": name, "on_stage_device": bool}
        manifest.json           written last: format, iteration, fingerprint and its fields, and the
                                size and sha256 of each file above

A checkpoint is written into `DIR/.iter_000012.<random>.partial` (`files.atomic_output`) and renamed when whole, so a folder named
`iter_*` is always complete; the older checkpoints are deleted after, and all once the video is out.
The fingerprint is the sha256 of a canonical JSON of everything the latents depend on (the config
fields tagged `latents=True` in config.py, the content of the model folder, the format); not the
number of ranks, which the latents do not depend on, so a run may resume on another number of stages.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config import LATENTS_FIELDS
from ..files import atomic_output, fsync
from ..pipeline.denoise import BlockLatents, GenerationPlan

log = logging.getLogger(__name__)

FORMAT = 2  # 2: the model is fingerprinted by its content (modelcheck.weights_fingerprint), not its path
LATENTS, SCHEDULERS, STATE, MANIFEST = "latents.safetensors", "schedulers.safetensors", "state.json", "manifest.json"
_CHECKPOINT = re.compile(r"iter_(\d{6,})")


class ResumeError(ValueError):
    """A checkpoint folder that cannot be resumed from, in one line that names it."""


def fingerprint_fields(cfg, model_path: Path) -> dict[str, Any]:
    """What the latents of `cfg` depend on, as JSON values."""
    from ..wan.modelcheck import weights_fingerprint

    fields = cfg.model_dump(mode="json", include=set(LATENTS_FIELDS))
    # the model's content (weights, configs, tokenizer, scheduler), not its path: another model at the
    # same path is another run, the same model copied elsewhere is not
    fields.update(model=weights_fingerprint(Path(model_path)), format=FORMAT)
    if cfg.image:  # the image's bytes and the encoders that turn it into the condition, not its path
        from ..pipeline.image import file_digest

        fields["image"] = {"file": file_digest(cfg.image),
                           "encoders": weights_fingerprint(Path(model_path), ("vae", "image_encoder"))}
    return fields


def fingerprint(fields: dict[str, Any]) -> str:
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class Resume:
    """The first stage's state at the start of iteration `iteration`."""

    iteration: int
    latents: list[torch.Tensor]
    schedulers: dict[int, dict[str, Any]]  # block -> scheduler attributes (BlockLatents' `states`)


@dataclass(frozen=True)
class Checkpoints:
    """The checkpoint folder of one run, as decided on rank 0 and shared with every rank."""

    folder: Path
    every: int
    fields: dict[str, Any]
    start: int = 0  # the iteration the newest checkpoint continues from; 0 starts afresh

    @classmethod
    def open(cls, folder: Path, every: int, cfg, model_path: Path, num_iterations: int) -> Checkpoints:
        """The folder's newest complete checkpoint, checked against this run (raises ResumeError)."""
        checkpoints = cls(Path(folder), every, fingerprint_fields(cfg, model_path))
        newest = checkpoints._newest()
        if newest is None:
            return checkpoints
        manifest = checkpoints._check(newest)
        iteration = manifest.get("iteration")
        if not isinstance(iteration, int) or isinstance(iteration, bool) or not 0 < iteration < num_iterations:
            raise ResumeError(f"--checkpoint-dir: {newest}: iteration {iteration!r} is not in [1, {num_iterations})")
        # the files agree with the manifest and this run, before work starts
        checkpoints._read(newest, iteration, cfg, model_path=model_path)
        log.info("resuming from %s: iteration %d of %d", newest, iteration, num_iterations)
        return cls(checkpoints.folder, every, checkpoints.fields, iteration)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.fields)

    def path(self, iteration: int) -> Path:
        return self.folder / f"iter_{iteration:06d}"

    def _complete(self) -> dict[int, Path]:
        if not self.folder.is_dir():
            return {}
        found = {}
        for path in self.folder.iterdir():
            match = _CHECKPOINT.fullmatch(path.name)
            if match and (path / MANIFEST).is_file():
                found[int(match.group(1))] = path
        return found

    def _newest(self) -> Path | None:
        complete = self._complete()
        return complete[max(complete)] if complete else None

    def _check(self, path: Path) -> dict:
        """The manifest of the checkpoint at `path`, if it is whole and of this run."""
        try:
            manifest = json.loads((path / MANIFEST).read_text())
            if not isinstance(manifest, dict):
                raise ValueError("not a JSON object")
            files = manifest["files"]
            for name in (LATENTS, SCHEDULERS, STATE):
                if _digest(path / name) != files[name]:
                    raise ValueError(f"{name} does not match the manifest")
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ResumeError(f"--checkpoint-dir: {path} is damaged ({err}); delete it to start over") from None
        if manifest.get("format") != FORMAT or manifest.get("fingerprint") != self.fingerprint:
            saved = manifest.get("fields") if isinstance(manifest.get("fields"), dict) else {}
            differing = sorted(k for k in set(saved) | set(self.fields) if saved.get(k) != self.fields.get(k))
            what = ", ".join(differing) or "fingerprint"
            raise ResumeError(f"--checkpoint-dir: {path} is a checkpoint of another run (different {what}); "
                              "give another --checkpoint-dir or delete it")
        return manifest

    def _read(self, path: Path, iteration: int, cfg=None, plan: GenerationPlan | None = None,
              model_path: Path | None = None):
        """(latents, state, scheduler tensors) of the checkpoint at `path`, checked against the run."""
        from ..pipeline.timeline import BlockTimeline

        if plan is not None:
            timeline, size = plan.timeline, (plan.latent_height, plan.latent_width)
        else:
            timeline = BlockTimeline(cfg.latent_frames, cfg.block_size, cfg.context, cfg.num_inference_steps)
            from ..pipeline.image import read_vae_config, spatial_factor

            factor = spatial_factor(read_vae_config(model_path))
            size = (cfg.height // factor, cfg.width // factor)
        try:
            saved = load_file(str(path / LATENTS))
            latents = [saved.pop(f"block_{b:04d}") for b in range(timeline.num_blocks)]
            for b, block in enumerate(latents):
                want = (timeline.block_len(b), *size)
                if block.ndim != 5 or tuple(block.shape[2:]) != want or block.dtype != torch.float32:
                    raise ValueError(f"block {b} is {block.dtype} {tuple(block.shape)}, expected float32 (1, C, *{want})")
            if len({tuple(block.shape[:2]) for block in latents}) != 1:
                raise ValueError("blocks of different channel counts")
            if saved:
                raise ValueError(f"unexpected tensors {sorted(saved)[:3]}")
            tensors = load_file(str(path / SCHEDULERS))
            state = json.loads((path / STATE).read_text())
            if not isinstance(state, dict) or state.get("iteration") != iteration:
                raise ValueError(f"state.json is not of iteration {iteration}")
            if not isinstance(state.get("schedulers"), dict):
                raise ValueError("state.json has no 'schedulers' object")
            for b, attributes in state["schedulers"].items():
                if not 0 <= int(b) < timeline.num_blocks or not isinstance(attributes, dict):
                    raise ValueError(f"state.json: scheduler of block {b!r}")
                _decode(list(attributes.values()), tensors, torch.device("cpu"))  # every tensor it names is there
        except KeyError as err:
            raise ResumeError(f"--checkpoint-dir: {path} is damaged (missing {err}); delete it to start over") from None
        except Exception as err:  # safetensors' own errors are not ValueErrors
            detail = " ".join(str(err).splitlines()) or type(err).__name__
            raise ResumeError(f"--checkpoint-dir: {path} is damaged ({detail}); delete it to start over") from None
        return latents, state, tensors

    def load(self, plan: GenerationPlan, device: torch.device) -> Resume:
        """The state saved at `start` (first stage), checked against the plan's blocks."""
        path = self.path(self.start)
        self._check(path)
        latents, state, tensors = self._read(path, self.start, plan=plan)
        try:
            schedulers = {int(b): {name: _decode(v, tensors, device) for name, v in attributes.items()}
                          for b, attributes in state["schedulers"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ResumeError(f"--checkpoint-dir: {path} is damaged ({err}); delete it to start over") from None
        return Resume(self.start, [t.to(device) for t in latents], schedulers)

    def save(self, iteration: int, latents: BlockLatents) -> Path | None:
        """Writes the state at the start of `iteration` atomically, then deletes the older checkpoints.

        A checkpoint that cannot be written (disk full, ...) is logged and skipped: the generation goes
        on (the other stages are in step with this one) and the older checkpoint stays.
        """
        final = self.path(iteration)
        try:
            with atomic_output(final, overwrite=True, folder=True) as partial:
                tensors: dict[str, torch.Tensor] = {}
                schedulers = {
                    str(b): {name: _encode(value, f"{b}/{name}", tensors) for name, value in state.items()}
                    for b, state in latents.scheduler_states(iteration).items()
                }
                _save_tensors(partial / LATENTS, {f"block_{b:04d}": t for b, t in enumerate(latents.latents)})
                _save_tensors(partial / SCHEDULERS, tensors)
                _write(partial / STATE, json.dumps({"iteration": iteration, "schedulers": schedulers}, indent=1))
                manifest = dict(format=FORMAT, iteration=iteration, fingerprint=self.fingerprint, fields=self.fields,
                                files={name: _digest(partial / name) for name in (LATENTS, SCHEDULERS, STATE)})
                _write(partial / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
                fsync(partial)
        except (OSError, SafetensorError) as err:  # safetensors' I/O errors (disk full) are not OSErrors
            log.error("checkpoint %s not saved (%s); the run goes on", final, getattr(err, "strerror", None) or err)
            return None
        for older, path in self._complete().items():
            if older != iteration:
                shutil.rmtree(path)
        log.info("checkpoint %s saved", final)
        return final

    def clear(self) -> None:
        """Deletes every checkpoint of the folder (the video is written: nothing is left to resume)."""
        for path in self._complete().values():
            shutil.rmtree(path)
        if self.folder.is_dir():
            for path in self.folder.glob(".iter_*.partial"):
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def _encode(value: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """A scheduler attribute as JSON; its tensors go into `tensors` under names made from `key`."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        tensors[key] = value
        return {"tensor": key, "on_stage_device": value.device.type != "cpu"}
    if isinstance(value, (list, tuple)):
        return [_encode(v, f"{key}/{n}", tensors) for n, v in enumerate(value)]
    raise TypeError(f"scheduler attribute {key}: cannot checkpoint a {type(value).__name__}")


def _decode(value: Any, tensors: dict[str, torch.Tensor], device: torch.device) -> Any:
    if isinstance(value, dict):
        tensor = tensors[value["tensor"]]
        return tensor.to(device) if value["on_stage_device"] else tensor
    if isinstance(value, list):
        return [_decode(v, tensors, device) for v in value]
    return value


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    # copies: entries such as a scheduler's timesteps are views of one tensor, which safetensors refuses
    save_file({k: t.detach().to("cpu", copy=True).contiguous() for k, t in tensors.items()}, str(path))
    fsync(path)


def _write(path: Path, text: str) -> None:
    path.write_text(text)
    fsync(path)


def _digest(path: Path) -> dict[str, Any]:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": sha.hexdigest()}
