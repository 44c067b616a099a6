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

import copy
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

# 2: the model is fingerprinted by its content (modelcheck.weights_fingerprint), not its path;
# 3: a UniPC block's state is `pipeline.unipc.UniPC`'s (steps_taken, model_outputs, last_sample), not diffusers'
FORMAT = 3
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
    if cfg.continue_from is not None:  # likewise the clip's content, not its path
        from ..pipeline.clip import content_digest

        fields["continue_from"] = content_digest(cfg.continue_from)
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
        folder = Path(folder)
        if folder.is_symlink():
            raise ResumeError(f"--checkpoint-dir: {folder} is a symbolic link; give the folder itself "
                              "(checkpoints are replaced and deleted in it)")
        checkpoints = cls(folder, every, fingerprint_fields(cfg, model_path))
        linked = next((p for p in checkpoints._entries() if p.is_symlink()), None)
        if linked is not None:
            raise ResumeError(f"--checkpoint-dir: {linked} is a symbolic link, not a checkpoint this program "
                              "wrote; remove it")
        newest = checkpoints._newest()
        if newest is None:
            return checkpoints
        manifest = checkpoints._check(newest)
        iteration = manifest.get("iteration")
        if not isinstance(iteration, int) or isinstance(iteration, bool) or not 0 < iteration < num_iterations:
            raise ResumeError(f"--checkpoint-dir: {newest}: iteration {iteration!r} is not in [1, {num_iterations})")
        # the files agree with the manifest and this run, before work starts
        latents, state, tensors = checkpoints._read(newest, iteration, cfg, model_path=model_path)
        problem = scheduler_state_problem(state["schedulers"], tensors, latents, cfg, model_path, iteration)
        if problem is not None:
            raise ResumeError(f"--checkpoint-dir: {newest} is damaged ({problem}); delete it to start over")
        log.info("resuming from %s: iteration %d of %d", newest, iteration, num_iterations)
        return cls(checkpoints.folder, every, checkpoints.fields, iteration)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.fields)

    def path(self, iteration: int) -> Path:
        return self.folder / f"iter_{iteration:06d}"

    def _entries(self) -> list[Path]:
        """The folder's entries named like checkpoints (`iter_<iteration>`)."""
        if not self.folder.is_dir():
            return []
        return [path for path in self.folder.iterdir() if _CHECKPOINT.fullmatch(path.name)]

    def _complete(self) -> dict[int, Path]:
        return {int(_CHECKPOINT.fullmatch(path.name).group(1)): path for path in self._entries()
                if not path.is_symlink() and (path / MANIFEST).is_file()}

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
        except RecursionError:
            raise ResumeError(f"--checkpoint-dir: {path} is damaged (its manifest is nested too deeply); "
                              "delete it to start over") from None
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ResumeError(f"--checkpoint-dir: {path} is damaged ({err}); delete it to start over") from None
        written = manifest.get("format")
        if isinstance(written, int) and not isinstance(written, bool) and 0 < written < FORMAT:
            raise ResumeError(f"--checkpoint-dir: {path} was written by an earlier version of ds_dualparal "
                              f"(checkpoint format {written}; this version reads format {FORMAT}); resume it with "
                              "that version, or delete it to start over")
        if written != FORMAT or manifest.get("fingerprint") != self.fingerprint:
            saved = manifest.get("fields") if isinstance(manifest.get("fields"), dict) else {}
            differing = sorted(k for k in set(saved) | set(self.fields) if saved.get(k) != self.fields.get(k))
            what = ", ".join(differing) or "fingerprint"
            raise ResumeError(f"--checkpoint-dir: {path} is a checkpoint of another run (different {what}); "
                              "give another --checkpoint-dir or delete it")
        return manifest

    def _read(self, path: Path, iteration: int, cfg=None, plan: GenerationPlan | None = None,
              model_path: Path | None = None):
        """(latents, state, scheduler tensors) of the checkpoint at `path`, checked against the run."""
        from ..pipeline.clip import job_timeline

        if plan is not None:
            timeline, size = plan.timeline, (plan.latent_height, plan.latent_width)
        else:
            timeline = job_timeline(cfg)
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
            if not all(bool(torch.isfinite(block).all()) for block in latents):
                raise ValueError("its latents hold values that are not finite (NaN or inf)")
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


_PROBE_SHAPE = (1, 3, 1, 2, 5)  # a latent shape no other scheduler tensor has: marks the latent-shaped ones


def scheduler_state_problem(saved: dict, tensors: dict[str, torch.Tensor], latents: list[torch.Tensor], cfg,
                            model_path: Path, iteration: int) -> str | None:
    """What is wrong with the saved scheduler states, checked field by field against the scheduler's own
    state after the same number of steps; None if nothing. A state is set attribute by attribute on a
    fresh scheduler, so an edited one (with the manifest's hashes recomputed) would otherwise fail in
    the middle of the generation, or not at all and give other latents.

    Each block `b` in progress has taken `iteration - b` steps. Its attributes must be the reference's
    names, and each value of the reference's kind: the same int/float/bool/None (counters and indices
    are fixed by the step count), lists of the same length, and tensors of the reference's dtype and
    shape (the block's latent shape where the reference's is latent-shaped) with the same values where
    they do not depend on the latents and finite values where they do."""
    from ..pipeline.denoise import block_scheduler, make_scheduler, scheduler_state

    fresh = block_scheduler(make_scheduler(cfg.scheduler, cfg.flow_shift, cfg.num_inference_steps,
                                           Path(model_path) / "scheduler"))
    probe = torch.zeros(_PROBE_SHAPE)
    stepped = copy.deepcopy(fresh)
    references = {0: copy.deepcopy(scheduler_state(stepped, fresh))}  # copies: step() changes lists in place
    for step, t in enumerate(fresh.timesteps[: iteration], start=1):
        probe = stepped.step(torch.zeros_like(probe), t, probe, return_dict=False)[0]
        references[step] = copy.deepcopy(scheduler_state(stepped, fresh))
    for block, attributes in saved.items():
        steps = iteration - int(block)
        if not 0 < steps < cfg.num_inference_steps:
            return f"state.json: block {block} is not in progress at iteration {iteration}"
        reference = references[steps]
        if set(attributes) != set(reference):
            return f"state.json: block {block}'s scheduler has {sorted(attributes)}, expected {sorted(reference)}"
        for name, value in attributes.items():
            problem = _value_problem(_decode(value, tensors, torch.device("cpu")), reference[name],
                                     tuple(latents[int(block)].shape))
            if problem is not None:
                return f"state.json: block {block}'s {name} {problem}"
    return None


def _value_problem(value: Any, reference: Any, latent_shape: tuple[int, ...]) -> str | None:
    if isinstance(reference, torch.Tensor):
        if not isinstance(value, torch.Tensor):
            return f"is {type(value).__name__}, expected a tensor"
        latent = tuple(reference.shape) == _PROBE_SHAPE
        shape = latent_shape if latent else tuple(reference.shape)
        if value.dtype != reference.dtype or tuple(value.shape) != shape:
            return f"is {value.dtype} {tuple(value.shape)}, expected {reference.dtype} {shape}"
        if latent and not bool(torch.isfinite(value).all()):
            return "holds values that are not finite"
        if not latent and not torch.equal(value, reference.cpu()):
            return "differs from the scheduler's own values"
        return None
    if isinstance(reference, list):
        if not isinstance(value, list) or len(value) != len(reference):
            return f"is not a list of {len(reference)}"
        return next((f"[{i}] {p}" for i, (v, r) in enumerate(zip(value, reference))
                     if (p := _value_problem(v, r, latent_shape)) is not None), None)
    if type(value) is not type(reference) or value != reference:
        return f"is {value!r}, expected {reference!r}"
    return None


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
