"""Run configuration: the ``dualparal`` section of a config JSON, validated into ``DualParalConfig``.

Only the ``dualparal`` section is read. The shipped files are shaped like DeepSpeed configs and may
hold DeepSpeed's own top-level keys, but those are accepted and ignored: nothing passes them to
DeepSpeed. Every user mistake surfaces as one ``ConfigError`` line that starts with the offending
field's path and says what is allowed. No torch import: the config is checked before anything
heavy starts.

Each field is declared once, with ``setting(...)``, which tags it for the rest of the program:

- ``scope="model"``: fixed when the model loads, the same for every job of a run (a jobs line that
  sets it is refused); ``scope="job"``: may change per job.
- ``latents=True``: the final latents depend on it, so it is part of a resume checkpoint's
  fingerprint (``checkpoint.py``).
- ``flag="name"``: the command-line flag ``--name`` that overrides it (``cli.py``); its help text is
  the field's description, its type and shown choices come from the annotation (a type other than
  int, float, str or a Literal arrives as text). A flag whose name differs from the field is also
  accepted as a key in a jobs line (``frames`` for ``num_frames``).
- ``flag_options={...}``: extra ``argparse.add_argument`` keywords, for a flag that argparse must
  handle specially. E.g. a repeatable ``--lora PATH[:SCALE]`` takes ``flag_options={"action":
  "append", "metavar": "PATH[:SCALE]"}``; argparse then hands over a list of strings, which the
  field's own ``field_validator(..., mode="before")`` turns into the field's type.

``MODEL_FIELDS``, ``LATENTS_FIELDS`` and ``FLAGS`` below are derived from these tags, and the
allowed schedulers and noise modes from their ``Literal`` types: adding a setting is one
declaration in ``DualParalConfig`` (plus the code that uses it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Literal, Mapping, get_args

import pydantic
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from .files import no_duplicate_keys, read_regular_file
from .pipeline.timeline import BlockTimeline

SECTION = "dualparal"

# VAE downsamples space by 8, the patch embedding by 2 more.
SPATIAL_MULTIPLE = 16
# Wan's causal VAE maps 4k+1 video frames to k+1 latent frames.
TEMPORAL_FACTOR = 4
# Wan pads or cuts every prompt to this many UMT5 tokens.
TEXT_TOKENS = 512
# Wan2.2-T2V-A14B's boundary_ratio: its high-noise expert runs the steps with t >= ratio * 1000.
WAN22_BOUNDARY_RATIO = 0.875

# diffusers attention backends that run without downloading kernels and accept a key/value
# sequence longer than the query (the feature cache makes it so), and "flash_4": FlashAttention 4
# (the flash-attn-4 package) for the self-attention, called by this project (wan/model.py).
AttentionBackend = Literal[
    "native",
    "_native_cudnn",
    "_native_efficient",
    "_native_flash",
    "_native_math",
    "flash",
    "_flash_3",
    "sage",
    "xformers",
    "flash_4",
]
ATTENTION_BACKENDS = get_args(AttentionBackend)
Scheduler = Literal["unipc", "euler"]
SCHEDULERS = get_args(Scheduler)
NoiseMode = Literal["coordinated", "independent"]
NOISE_MODES = get_args(NoiseMode)
Dtype = Literal["float32", "bfloat16", "float16"]


def setting(
    default: Any,
    description: str,
    *,
    scope: Literal["model", "job"],
    latents: bool,
    flag: str | None = None,
    flag_options: dict[str, Any] | None = None,
    **constraints: Any,
) -> Any:
    """A ``DualParalConfig`` field with its tags (module docstring); ``constraints`` go to pydantic's Field."""
    tags = {"scope": scope, "latents": latents, "flag": flag, "flag_options": flag_options or {}}
    return Field(default, description=description, json_schema_extra=tags, **constraints)

# the backends that also run on a CPU (the others need CUDA kernels)
CPU_ATTENTION_BACKENDS = ("native", "_native_math", "_native_flash")

# Past these the numbers overflow (all-NaN latents, a timeout timedelta cannot hold, a seed torch's
# generator refuses); Wan's own settings are guidance 3-7 and flow shift 2-12.
MAX_GUIDANCE = 100.0
MAX_FLOW_SHIFT = 100.0
MAX_SEED = 2**63 - 1
MAX_STEPS = 1000  # Wan samples in 50; diffusers' own UniPC fails from ~334 (the engine's does not)
MAX_COMM_TIMEOUT_S = 7 * 24 * 3600
MAX_INPUT_FILE_BYTES = 64 * 2**20  # a config or prompts file; larger is a mistake (or /dev/zero)


class ConfigError(ValueError):
    """A configuration mistake, reported in one line that starts with the field's path."""

    def __init__(self, message: str):
        super().__init__(_one_line(message))


class LoraSpec(BaseModel):
    """One LoRA of ``loras``: fused into the transformer's weights at load."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    path: str = Field(min_length=1, description="Local .safetensors file (diffusers/PEFT or original Wan names).")
    scale: float = Field(1.0, allow_inf_nan=False, description="Multiplies the LoRA's delta (alpha/rank included).")
    expert: Literal["high_noise", "low_noise", "both"] = Field(
        "both", description="Wan2.2-A14B: the expert it applies to (transformer / transformer_2); 'both' otherwise."
    )


class PromptSegment(BaseModel):
    """One segment of ``prompts``: the prompt from video frame ``from_frame`` on (to the next segment)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    from_frame: int = Field(ge=0, description="First video frame of the segment (the first segment starts at 0).")
    prompt: str = Field(description="Text prompt of the segment.")
    negative_prompt: str | None = Field(None, description="Negative prompt of the segment; unset: negative_prompt.")

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _text(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return value
        if info.field_name == "prompt" and not value.strip():
            raise PydanticCustomError("dualparal", "must not be empty")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise PydanticCustomError("dualparal", "holds a lone surrogate (\\ud800-\\udfff), which is not text") from None
        return value


def read_prompts_file(path: str) -> list:
    """``--prompts FILE``: the JSON array of segments in FILE (argparse's ``type``; checked as the config is)."""
    try:
        text = read_regular_file(path, MAX_INPUT_FILE_BYTES).decode("utf-8-sig")
        return json.loads(text, object_pairs_hook=no_duplicate_keys, parse_constant=_reject_constant)
    except FileNotFoundError:
        raise argparse.ArgumentTypeError(f"{path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise argparse.ArgumentTypeError(f"{path}: cannot read it ({_describe(exc)})") from None


class DualParalConfig(BaseModel):
    """The ``dualparal`` section of a run config."""

    # Strict: a JSON config says 480, not "480" or 480.0 or true.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    model: str | None = setting(
        None,
        "Local diffusers folder or hub id of a Wan model (text- or image-to-video); unset: the embedded tiny "
        "checkpoint.",
        scope="model", latents=True, flag="model",
        min_length=1,
    )
    prompt: str = setting(
        "A cat walks on the grass, realistic style.", "Text prompt for the video.",
        scope="job", latents=True, flag="prompt",
    )
    negative_prompt: str = setting(
        "", "Negative prompt, used by classifier-free guidance.", scope="job", latents=True, flag="negative_prompt"
    )
    height: int = setting(
        480, "Video height in pixels, a multiple of 16.", scope="job", latents=True, flag="height", gt=0
    )
    width: int = setting(
        832, "Video width in pixels, a multiple of 16.", scope="job", latents=True, flag="width", gt=0
    )
    num_frames: int = setting(
        81, "Video frames, 4k+1 (the VAE's temporal compression).", scope="job", latents=True, flag="frames", ge=1
    )
    num_inference_steps: int = setting(
        50, "Denoising steps per block.", scope="job", latents=True, flag="steps", ge=1, le=MAX_STEPS,
    )
    guidance_scale: float = setting(
        5.0, "Classifier-free guidance scale; CFG is on when > 1.", scope="job", latents=True, flag="guidance",
        ge=0, le=MAX_GUIDANCE, allow_inf_nan=False,
    )
    guidance_scale_2: float | None = setting(
        None, "Guidance scale of Wan2.2's low-noise expert; unset: guidance_scale.",
        scope="job", latents=True,
        ge=0, le=MAX_GUIDANCE, allow_inf_nan=False,
    )
    scheduler: Scheduler = setting(
        "unipc", "Per-block scheduler: UniPC multistep or flow-match Euler.",
        scope="job", latents=True, flag="scheduler",
    )
    flow_shift: float = setting(
        3.0, "Flow-matching timestep shift.", scope="job", latents=True, flag="flow_shift", gt=0, le=MAX_FLOW_SHIFT,
        allow_inf_nan=False,
    )
    block_size: int = setting(8, "Latent frames per block (B).", scope="job", latents=True, flag="block_size", ge=1)
    context: int = setting(
        8, "Latent frames of context shared with each neighbouring block (c <= B).",
        scope="job", latents=True, flag="context", ge=0,
    )
    noise: NoiseMode = setting(
        "coordinated", "Initial noise: one shared pool permuted per block, or fresh noise per block.",
        scope="job", latents=True, flag="noise",
    )
    prompts: tuple[PromptSegment, ...] | None = setting(
        None, "Prompt schedule instead of prompt: a JSON array of {from_frame, prompt, negative_prompt (optional)} "
        "segments, the first at frame 0; each block takes the segment of its middle video frame. "
        "The flag reads the array from a JSON file.",
        scope="job", latents=True, flag="prompts", flag_options={"type": read_prompts_file, "metavar": "FILE"},
        strict=False,
    )
    image: str | None = setting(
        None, "PNG or JPEG file: the video's first frame, for image-to-video models (Wan2.1-I2V, Wan2.2-I2V, "
        "Wan2.2-TI2V); see docs/image-to-video.md.",
        scope="job", latents=True, flag="image", min_length=1,
    )
    prompt_transition: int = setting(
        0, "Blocks over which the text embeddings are blended linearly around each change of prompts (0: a cut).",
        scope="job", latents=True, flag="prompt_transition", ge=0,
    )
    dtype: Dtype = setting(
        "bfloat16", "Dtype of the transformer's weights and activations.", scope="model", latents=True, flag="dtype"
    )
    seed: int = setting(
        0, "Seed of the initial noise; the output depends on nothing else random.",
        scope="job", latents=True, flag="seed", ge=0, le=MAX_SEED,
    )
    partition_method: str = setting(
        "type:WanBlockLayer", "DeepSpeed pipeline partitioning: 'uniform' or 'type:<regex>' over layer class names.",
        scope="model", latents=False,
    )
    pipeline_stages: int | None = setting(
        None, "Pipeline stages per replica; unset: all ranks in one replica.",
        scope="model", latents=False, flag="stages", ge=1,
    )
    attention_backend: AttentionBackend | None = setting(
        None, "diffusers attention backend, or flash_4 (FlashAttention 4 for the self-attention: the "
        "flash-attn-4 package, not installed with this project); unset: diffusers' default.",
        scope="model", latents=True, flag="attention_backend",
    )
    compile: bool | None = setting(
        None, "Fast path: fused q/k/v projections and torch.compile of every transformer block; "
        "unset: on with CUDA, off on CPU.",
        scope="model", latents=True, flag="compile",
        flag_options={"action": argparse.BooleanOptionalAction, "type": None, "metavar": None},
    )
    vae_dtype: Literal["float32", "bfloat16"] = setting(
        "float32", "Dtype of the VAE decoder (bfloat16: faster, half the memory, pixels within a few levels).",
        scope="model", latents=False, flag="vae_dtype",
    )
    first_stage_vae_layers: float = setting(
        0.0, "Stage 0 decodes the finished blocks: give it this many transformer blocks' worth of work less "
        "when partitioning (0: an even split, which measured best for the anchor config, see BENCHMARKS.md).",
        scope="model", latents=False, ge=0, allow_inf_nan=False,
    )
    loras: tuple[LoraSpec, ...] = setting(
        (), "LoRAs fused into the weights at load, in order (model-level, like model).",
        scope="model", latents=True, strict=False,
    )
    comm_timeout_s: int = setting(
        600, "Seconds a transfer may wait for a peer rank before the run fails (default 600: a hung rank is "
        "given up after about 10 minutes).", scope="model", latents=False, gt=0, le=MAX_COMM_TIMEOUT_S,
    )
    continue_from: str | None = setting(
        None, "Continue this clip: latents written by --save-latents (.safetensors) or a video the model's VAE "
        "encodes; its frames open the output, and --frames counts them (docs/continue-a-clip.md).",
        scope="job", latents=True, flag="continue_from", min_length=1,
    )
    output: str = setting(
        "outputs/video.mp4", "Path of the output video (mp4).", scope="job", latents=False, flag="output", min_length=1
    )
    save_latents: str | None = setting(
        None, "If set, also save the final latents to this path (safetensors, key 'latents').",
        scope="job", latents=False, flag="save_latents", min_length=1,
    )
    fps: int = setting(16, "Frames per second of the output video.", scope="job", latents=False, flag="fps", gt=0)

    @property
    def latent_frames(self) -> int:
        return (self.num_frames - 1) // TEMPORAL_FACTOR + 1

    @property
    def prompt_schedule(self) -> tuple[tuple[int, str, str], ...]:
        """(from_frame, prompt, negative prompt) per segment; a single prompt is one segment at frame 0."""
        if self.prompts is None:
            return ((0, self.prompt, self.negative_prompt),)
        return tuple((s.from_frame, s.prompt, self.negative_prompt if s.negative_prompt is None else s.negative_prompt)
                     for s in self.prompts)

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self.guidance_scale > 1.0

    @property
    def low_noise_guidance_scale(self) -> float:
        return self.guidance_scale if self.guidance_scale_2 is None else self.guidance_scale_2

    def pipeline_topology(self, world_size: int) -> tuple[int, int]:
        """(pipeline stages, data-parallel replicas) for ``world_size`` ranks."""
        stages = world_size if self.pipeline_stages is None else self.pipeline_stages
        if world_size % stages:
            raise ConfigError(
                f"{SECTION}.pipeline_stages: {stages} does not divide the world size ({world_size}); "
                f"allowed: {', '.join(str(d) for d in _divisors(world_size))}"
            )
        return stages, world_size // stages

    def with_overrides(self, **overrides: Any) -> DualParalConfig:
        """A copy with ``overrides`` applied, validated again (None is a value here, not 'unset').

        A ``prompt`` or ``prompts`` among the overrides replaces both of this config's (``layered``)."""
        return _validate_section(layered(self.model_dump(include=self.model_fields_set), overrides))

    @field_validator("height", "width")
    @classmethod
    def _spatial_multiple(cls, value: int) -> int:
        if value % SPATIAL_MULTIPLE:
            low = value - value % SPATIAL_MULTIPLE
            nearest = f"{low} or {low + SPATIAL_MULTIPLE}" if low > 0 else f"{SPATIAL_MULTIPLE}"
            raise PydanticCustomError(
                "dualparal",
                "{value} is not a multiple of {m}; nearest valid: {nearest}",
                {"value": value, "m": SPATIAL_MULTIPLE, "nearest": nearest},
            )
        return value

    @field_validator("num_frames")
    @classmethod
    def _temporal_multiple(cls, value: int) -> int:
        if (value - 1) % TEMPORAL_FACTOR:
            low = value - (value - 1) % TEMPORAL_FACTOR
            raise PydanticCustomError(
                "dualparal",
                "{value} is not 4k+1; nearest valid: {low} or {high}",
                {"value": value, "low": low, "high": low + TEMPORAL_FACTOR},
            )
        return value

    @field_validator("context")
    @classmethod
    def _context_within_block(cls, value: int, info: ValidationInfo) -> int:
        block_size = info.data.get("block_size")
        if block_size is not None and value > block_size:
            raise PydanticCustomError(
                "dualparal",
                "{value} must be <= block_size ({block_size})",
                {"value": value, "block_size": block_size},
            )
        return value

    @model_validator(mode="before")
    @classmethod
    def _prompt_or_prompts(cls, values: Any) -> Any:
        if isinstance(values, dict) and values.get("prompts") is not None and "prompt" in values:
            raise PydanticCustomError(
                "dualparal", "given together with prompt; a schedule replaces the single prompt: give one of them",
                {"field": "prompts"},
            )
        return values

    @field_validator("prompts")
    @classmethod
    def _schedule(cls, value: tuple[PromptSegment, ...] | None, info: ValidationInfo):
        if value is None:
            return value
        if not value:
            raise PydanticCustomError(
                "dualparal", "is empty; give at least one segment, the first with from_frame 0, or leave it out")
        last_frame = info.data["num_frames"] - 1 if "num_frames" in info.data else None
        for index, segment in enumerate(value):
            frame = segment.from_frame
            if index == 0 and frame != 0:
                problem = f"from_frame is {frame}; the first segment must start at frame 0"
            elif index > 0 and frame <= value[index - 1].from_frame:
                problem = (f"from_frame {frame} is not after segment {index - 1}'s "
                           f"({value[index - 1].from_frame}); segments go in increasing from_frame")
            elif last_frame is not None and frame > last_frame:
                problem = f"from_frame {frame} is past the video's last frame ({last_frame})"
            else:
                continue
            raise PydanticCustomError("dualparal", "{problem}", {"problem": problem, "index": index})
        return value

    @field_validator("prompt_transition")
    @classmethod
    def _transition_within_video(cls, value: int, info: ValidationInfo) -> int:
        data = info.data
        if value and all(k in data for k in ("num_frames", "block_size", "context", "num_inference_steps")):
            frames = (data["num_frames"] - 1) // TEMPORAL_FACTOR + 1
            blocks = BlockTimeline(frames, data["block_size"], data["context"], data["num_inference_steps"]).num_blocks
            if value > blocks:
                raise PydanticCustomError(
                    "dualparal", "{value} blocks is longer than the video's {blocks} block(s)",
                    {"value": value, "blocks": blocks},
                )
        return value

    @field_validator("partition_method")
    @classmethod
    def _known_partition(cls, value: str) -> str:
        # DeepSpeed lower-cases the method and takes the regex as the text between the first two ':'.
        method = value.lower()
        if method == "parameters":
            raise PydanticCustomError(
                "dualparal",
                "'parameters' is not supported: it builds every layer on every rank to count "
                "parameters; use 'uniform' or 'type:<regex>'",
            )
        if method == "uniform":
            return value
        if not method.startswith("type:"):
            raise PydanticCustomError(
                "dualparal", "{shown} is not one of 'uniform', 'type:<regex>'", {"shown": _show(value)}
            )
        pattern = value[len("type:"):]
        if not pattern or ":" in pattern:
            raise PydanticCustomError(
                "dualparal",
                "{shown}: the regex after 'type:' must be non-empty and contain no ':'",
                {"shown": _show(value)},
            )
        try:
            re.compile(pattern)
        except re.error as exc:
            raise PydanticCustomError(
                "dualparal", "{shown}: invalid regex ({error})", {"shown": _show(value), "error": str(exc)}
            ) from None
        return value


def tags(name: str) -> dict[str, Any]:
    """The tags ``setting`` gave field ``name``: scope, latents, flag, flag_options."""
    extra = DualParalConfig.model_fields[name].json_schema_extra
    assert isinstance(extra, dict) and "scope" in extra, f"DualParalConfig.{name}: declare it with setting(...)"
    return extra


# Settings of the loaded model, the same for every job of a run.
MODEL_FIELDS = tuple(name for name in DualParalConfig.model_fields if tags(name)["scope"] == "model")
# Settings the final latents depend on (a resume checkpoint's fingerprint).
LATENTS_FIELDS = tuple(name for name in DualParalConfig.model_fields if tags(name)["latents"])
# Command-line flag (argparse dest; `--block-size` on the command line) -> field.
FLAGS = {tags(name)["flag"]: name for name in DualParalConfig.model_fields if tags(name)["flag"]}

_LORAS_SHAPE = 'an array of {"path": ..., "scale": ..., "expert": ...} objects'
_PROMPTS_SHAPE = 'an array of {"from_frame": ..., "prompt": ..., "negative_prompt": ...} objects, or null'
# fields that hold a list of objects: the object's model and the list's shape, for messages
_LISTS = {"loras": (LoraSpec, _LORAS_SHAPE), "prompts": (PromptSegment, _PROMPTS_SHAPE)}


@dataclass
class RunConfig:
    """A loaded config file: its validated ``dualparal`` section and where it came from."""

    dualparal: DualParalConfig
    source: str | None = None


def load_config(path: str | os.PathLike | None, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Read a config JSON (None: all defaults) and apply ``overrides`` (None values skipped)."""
    if path is None:
        return config_from_dict({}, overrides=overrides)
    source = os.fspath(path)
    try:
        text = read_regular_file(source, MAX_INPUT_FILE_BYTES).decode("utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"{source}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: cannot read config file ({_describe(exc)})") from None
    try:
        data = json.loads(text, object_pairs_hook=no_duplicate_keys, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{source}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"{source}: invalid JSON: {_describe(exc)}") from None
    return config_from_dict(data, source=source, overrides=overrides)


def layered(lower: Mapping[str, Any], upper: Mapping[str, Any]) -> dict:
    """``upper``'s settings over ``lower``'s. A single prompt and a prompt schedule exclude each other: a
    ``prompt`` or a ``prompts`` in ``upper`` replaces both of ``lower``'s (a flag over the config file, a jobs
    line over the run's config); both in one layer are an error (``DualParalConfig``)."""
    merged = dict(lower)
    if "prompt" in upper or upper.get("prompts") is not None:
        merged.pop("prompt", None)
        merged.pop("prompts", None)
    merged.update(upper)
    return merged


def config_from_dict(d: Any, source: str | None = None, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """The validated ``dualparal`` section of a parsed config; the other top-level keys are ignored."""
    where = source or "config"
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: the top level must be a JSON object, got {_json_type(d)}")
    section = d.get(SECTION, {})
    if not isinstance(section, dict):
        raise ConfigError(f"{SECTION}: must be a JSON object, got {_json_type(section)}")
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    return RunConfig(dualparal=_validate_section(layered(section, given)), source=source)


def _validate_section(values: dict) -> DualParalConfig:
    try:
        return DualParalConfig.model_validate(values)
    except pydantic.ValidationError as exc:
        raise ConfigError(_format_error(exc.errors(include_url=False)[0])) from None
    except RecursionError:
        raise ConfigError(f"{SECTION}: value nested too deeply") from None


def _format_error(error: Mapping[str, Any]) -> str:
    loc = error.get("loc", ())
    # A union (e.g. `str | None`) adds its member's name to the location; keep only the field.
    name = str(loc[0]) if loc else ""
    path = SECTION if not loc else f"{SECTION}.{name if name.isidentifier() else json.dumps(name)}"
    kind = error["type"]
    value = error.get("input")
    ctx = error.get("ctx") or {}
    shown = _show(value)
    model = DualParalConfig
    if not loc and "field" in ctx:  # a check of several fields (model_validator) names the one it is about
        path = f"{SECTION}.{ctx['field']}"
    if "index" in ctx:  # a check of a list names the entry
        path = f"{path}[{ctx['index']}]"
    if kind == "dualparal" and len(loc) <= 1:
        return f"{path}: {error['msg']}"
    if name in _LISTS:  # a list of objects: name the entry and its field
        entry, shape = _LISTS[name]
        if len(loc) < 3:
            where = path + (f"[{loc[1]}]" if len(loc) == 2 else "")
            return f"{where}: {shown} must be " + ("an object" if len(loc) == 2 else shape)
        model, name = entry, str(loc[2])
        path = f"{path}[{loc[1]}].{name}"
    if kind == "extra_forbidden":
        allowed = ", ".join(model.model_fields)
        return f"{path}: unknown field; allowed fields: {allowed}"
    if kind == "dualparal":
        return f"{path}: {error['msg']}"
    if kind == "missing":
        return f"{path}: is required"
    if kind == "literal_error":
        return f"{path}: {shown} is not allowed; expected {ctx.get('expected')}" + _none_hint(name, model)
    limits = {
        "greater_than": ">",
        "greater_than_equal": ">=",
        "less_than": "<",
        "less_than_equal": "<=",
    }
    if kind in limits:
        limit = next(iter(ctx.values()), "")
        return f"{path}: {shown} must be {limits[kind]} {limit}"
    if kind == "float_type" and type(value) is int:
        return f"{path}: {shown} is too large for a float"
    expected = _expected_type(name, model)
    if kind in ("int_type", "int_parsing", "int_from_float", "float_type", "float_parsing", "string_type", "bool_type"):
        return f"{path}: {shown} is not {expected}"
    if kind == "finite_number":
        return f"{path}: {shown} must be a finite number"
    if kind == "string_too_short":
        return f"{path}: must not be empty" + _none_hint(name, model)
    return f"{path}: {shown}: {error.get('msg', kind)}"


def _expected_type(name: str, model: type[BaseModel] = DualParalConfig) -> str:
    info = model.model_fields.get(name)
    if info is None:
        return "of the right type"
    types = getattr(info.annotation, "__args__", (info.annotation,))
    words = {int: "an integer", float: "a number", str: "a string"}
    word = next((words[t] for t in types if t in words), "of the right type")
    return word + (" or null" if type(None) in types else "")


def _none_hint(name: str, model: type[BaseModel] = DualParalConfig) -> str:
    info = model.model_fields.get(name)
    return " (or null)" if info is not None and info.default is None else ""


def _show(value: Any, limit: int = 60) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    if type(value) in names:
        return names[type(value)]
    if isinstance(value, (int, float)):
        return "a number"
    return type(value).__name__


def _one_line(message: str) -> str:
    return " ".join(message.splitlines())


def _describe(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
