"""Run configuration: a DeepSpeed config JSON whose ``dualparal`` section is validated here.

DeepSpeed's own top-level keys pass through untouched; the ``dualparal`` section becomes a
frozen, typed ``DualParalConfig``. Every user mistake surfaces as one ``ConfigError`` line that
starts with the offending field's path and says what is allowed. No torch import: the config is
checked before anything heavy starts.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, get_args

import pydantic
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from .files import no_duplicate_keys

SECTION = "dualparal"

# VAE downsamples space by 8, the patch embedding by 2 more.
SPATIAL_MULTIPLE = 16
# Wan's causal VAE maps 4k+1 video frames to k+1 latent frames.
TEMPORAL_FACTOR = 4

# diffusers attention backends that run without downloading kernels and accept a key/value
# sequence longer than the query (the feature cache makes it so).
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
]
ATTENTION_BACKENDS = get_args(AttentionBackend)
# the backends that also run on a CPU (the others need CUDA kernels)
CPU_ATTENTION_BACKENDS = ("native", "_native_math", "_native_flash")

# Past these the numbers overflow (all-NaN latents, a timeout timedelta cannot hold, a seed torch's
# generator refuses); Wan's own settings are guidance 3-7 and flow shift 2-12.
MAX_GUIDANCE = 100.0
MAX_FLOW_SHIFT = 100.0
MAX_SEED = 2**63 - 1
MAX_COMM_TIMEOUT_S = 7 * 24 * 3600


class ConfigError(ValueError):
    """A configuration mistake, reported in one line that starts with the field's path."""

    def __init__(self, message: str):
        super().__init__(_one_line(message))


class DualParalConfig(BaseModel):
    """The ``dualparal`` section of a run config."""

    # Strict: a JSON config says 480, not "480" or 480.0 or true.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    model: str | None = Field(
        None,
        min_length=1,
        description="Local diffusers folder or hub id of a Wan T2V model; None is the embedded tiny checkpoint.",
    )
    prompt: str = Field(
        "A cat walks on the grass, realistic style.", description="Text prompt for the video."
    )
    negative_prompt: str = Field("", description="Negative prompt, used by classifier-free guidance.")
    height: int = Field(480, gt=0, description="Video height in pixels, a multiple of 16.")
    width: int = Field(832, gt=0, description="Video width in pixels, a multiple of 16.")
    num_frames: int = Field(81, ge=1, description="Video frames, 4k+1 (the VAE's temporal compression).")
    num_inference_steps: int = Field(50, ge=1, description="Denoising steps per block.")
    guidance_scale: float = Field(
        5.0, ge=0, le=MAX_GUIDANCE, allow_inf_nan=False, description="Classifier-free guidance scale; CFG is on when > 1."
    )
    guidance_scale_2: float | None = Field(
        None,
        ge=0,
        le=MAX_GUIDANCE,
        allow_inf_nan=False,
        description="Guidance scale of Wan2.2's low-noise expert; None uses guidance_scale.",
    )
    scheduler: Literal["unipc", "euler"] = Field(
        "unipc", description="Per-block scheduler: UniPC multistep or flow-match Euler."
    )
    flow_shift: float = Field(
        3.0, gt=0, le=MAX_FLOW_SHIFT, allow_inf_nan=False, description="Flow-matching timestep shift."
    )
    block_size: int = Field(8, ge=1, description="Latent frames per block (B).")
    context: int = Field(
        8, ge=0, description="Latent frames of context shared with each neighbouring block (c <= B)."
    )
    noise: Literal["coordinated", "independent"] = Field(
        "coordinated",
        description="Initial noise: one shared pool permuted per block, or fresh noise per block.",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "bfloat16", description="Dtype of the transformer's weights and activations."
    )
    seed: int = Field(
        0, ge=0, le=MAX_SEED, description="Seed of the initial noise; the output depends on nothing else random."
    )
    partition_method: str = Field(
        "type:WanBlockLayer",
        description="DeepSpeed pipeline partitioning: 'uniform' or 'type:<regex>' over layer class names.",
    )
    pipeline_stages: int | None = Field(
        None, ge=1, description="Pipeline stages per replica; None uses all ranks in one replica."
    )
    attention_backend: AttentionBackend | None = Field(
        None, description="diffusers attention backend; None keeps diffusers' default."
    )
    comm_timeout_s: int = Field(
        600,
        gt=0,
        le=MAX_COMM_TIMEOUT_S,
        description="Seconds a transfer may wait for a peer rank before the run fails (default 600: a hung rank "
        "is given up after about 10 minutes).",
    )
    output: str = Field("outputs/video.mp4", min_length=1, description="Path of the output video.")
    save_latents: str | None = Field(
        None, min_length=1, description="If set, also save the final latents to this path."
    )
    fps: int = Field(16, gt=0, description="Frames per second of the output video.")

    @property
    def latent_frames(self) -> int:
        return (self.num_frames - 1) // TEMPORAL_FACTOR + 1

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
        """A copy with ``overrides`` applied, validated again (None is a value here, not 'unset')."""
        return _validate_section({**self.model_dump(), **overrides})

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


@dataclass
class RunConfig:
    """A whole run config: the validated section plus DeepSpeed's own keys, untouched."""

    dualparal: DualParalConfig
    deepspeed: dict = field(default_factory=dict)
    source: str | None = None


def load_config(path: str | os.PathLike | None, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Read a DeepSpeed config JSON (None: all defaults) and apply ``overrides`` (None values skipped)."""
    if path is None:
        return config_from_dict({}, overrides=overrides)
    source = os.fspath(path)
    try:
        with open(source, "rb") as f:
            text = f.read().decode("utf-8-sig")
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


def config_from_dict(d: Any, source: str | None = None, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Split a parsed config into DeepSpeed's keys and the validated ``dualparal`` section."""
    where = source or "config"
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: the top level must be a JSON object, got {_json_type(d)}")
    section = d.get(SECTION, {})
    if not isinstance(section, dict):
        raise ConfigError(f"{SECTION}: must be a JSON object, got {_json_type(section)}")
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    deepspeed = {k: v for k, v in d.items() if k != SECTION}
    return RunConfig(dualparal=_validate_section({**section, **given}), deepspeed=deepspeed, source=source)


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
    if kind == "extra_forbidden":
        allowed = ", ".join(DualParalConfig.model_fields)
        return f"{path}: unknown field; allowed fields: {allowed}"
    if kind == "dualparal":
        return f"{path}: {error['msg']}"
    if kind == "literal_error":
        return f"{path}: {shown} is not allowed; expected {ctx.get('expected')}" + _none_hint(name)
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
    expected = _expected_type(name)
    if kind in ("int_type", "int_parsing", "int_from_float", "float_type", "float_parsing", "string_type", "bool_type"):
        return f"{path}: {shown} is not {expected}"
    if kind == "finite_number":
        return f"{path}: {shown} must be a finite number"
    if kind == "string_too_short":
        return f"{path}: must not be empty" + _none_hint(name)
    return f"{path}: {shown}: {error.get('msg', kind)}"


def _expected_type(name: str) -> str:
    info = DualParalConfig.model_fields.get(name)
    if info is None:
        return "of the right type"
    types = getattr(info.annotation, "__args__", (info.annotation,))
    words = {int: "an integer", float: "a number", str: "a string"}
    word = next((words[t] for t in types if t in words), "of the right type")
    return word + (" or null" if type(None) in types else "")


def _none_hint(name: str) -> str:
    info = DualParalConfig.model_fields.get(name)
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
