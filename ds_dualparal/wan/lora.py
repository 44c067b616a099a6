"""LoRA adapters fused into the transformer's weights while each layer loads.

A LoRA changes a linear layer's weight by ``scale * (alpha / rank) * B @ A`` (and its bias by
``scale * bias_B`` where the file has one). `LoraWeights` wraps a stage's `WeightSource`: when a
layer is filled, it adds the deltas of exactly that layer's targets, reading only their tensors
from the file, one target at a time, in place. So a rank reads only its own layers' LoRA tensors,
no weight is ever held twice, and the forward is the plain model's: nothing extra per step.

Two namings are read, as diffusers' `WanLoraLoaderMixin.lora_state_dict` reads them: diffusers/PEFT
(``transformer.blocks.N.attn1.to_q.lora_A.weight``) as it is, and the original Wan module names most
community LoRAs ship in (``diffusion_model.blocks.N.self_attn.q.lora_down.weight``, ``.alpha``)
through diffusers' own converter. The converter works on a state dict; it is run on small
placeholders, each holding its key's number and the factor 1, so that what comes out says which
file key each diffusers name comes from and which factor (alpha's ``scale_down``/``scale_up``)
the converter applied to it. The real tensors are then read per layer and given the same factors.
The fuse follows PEFT's merge (``W += (B @ A) * scaling``) in fp32 and casts back to the weight's
dtype, so the fused weights are those of diffusers' ``load_lora_weights`` + ``fuse_lora``.

Only safetensors are read, never a pickle. Every mistake is a `LoraError` (a `ConfigError`) in one
line that names the file.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open

from ..config import ConfigError
from .model import Conditioner, WanConfig, WeightSource, layer_specs

log = logging.getLogger(__name__)

EXPERTS = {"high_noise": (0,), "low_noise": (1,)}  # Wan2.2-A14B: transformer, transformer_2
_ADAPTER_METADATA = "lora_adapter_metadata"  # diffusers' key in the safetensors header
_DIFFUSERS_PREFIX = "transformer."
_WAN_PREFIX = "diffusion_model."
_PARTS = {"lora_A.weight": "down", "lora_B.weight": "up", "lora_B.bias": "bias"}
_MAX_RANK = 2**20  # far above any real LoRA's rank; a larger `r` is a damaged header
# bytes per value of safetensors' dtype names (an unknown one counts 1, the smallest)
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}


class LoraError(ConfigError):
    """A LoRA that cannot be fused into this model, in one line that names the file."""


@dataclass
class _Tensor:
    key: str  # the key in the file
    factor: float  # what diffusers' converter multiplies it by (1.0 but for alpha)
    shape: tuple[int, ...]


@dataclass
class _Target:
    """One linear layer a LoRA changes: its down (A), up (B) and optional bias tensors."""

    parts: dict[str, _Tensor] = field(default_factory=dict)


class LoraFile:
    """The name mapping of one LoRA file: diffusers module name -> the file's tensors for it.

    Only the header and the scalar `.alpha` tensors are read here.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.name = str(path)
        if not self.path.exists():
            raise LoraError(f"lora {self.name}: file not found")
        if not self.path.is_file():
            raise LoraError(f"lora {self.name}: not a file (give the .safetensors file itself)")
        try:
            with safe_open(self.path, framework="pt") as f:
                shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
                self._check_sizes(shapes, {key: f.get_slice(key).get_dtype() for key in shapes})
                alphas = {key: self._read_alpha(f, key, shapes[key]) for key in shapes if key.endswith(".alpha")}
                header = f.metadata() or {}
        except (SafetensorError, OSError, ValueError) as err:
            raise LoraError(f"lora {self.name}: not a safetensors file ({_first_line(err)}); "
                            "LoRAs load only from safetensors") from None
        if not shapes:
            raise LoraError(f"lora {self.name}: holds no tensors")
        self.scaling = self._scaling(header)
        self.targets = self._map(shapes, alphas)
        self.tensors = sum(len(t.parts) for t in self.targets.values())

    def _check_sizes(self, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str]) -> None:
        """Every tensor's data fits in the file, and every rank (a lora_down's rows) is plausible: a header
        may claim any shape (a sparse file can back it), and the name mapping allocates a placeholder
        row per rank before the shapes are checked against the model."""
        size = self.path.stat().st_size
        for key, shape in shapes.items():
            count = 1
            for dim in shape:
                count *= dim
            if count * _DTYPE_BYTES.get(dtypes[key], 1) > size:
                raise LoraError(f"lora {self.name}: {key}: its header claims {'x'.join(map(str, shape))} "
                                f"{dtypes[key]} values, more than the file's {size} bytes hold (a damaged file?)")
            if shape and shape[0] > _MAX_RANK and key.endswith((".lora_down.weight", ".lora_A.weight")):
                raise LoraError(f"lora {self.name}: {key}: rank {shape[0]} is more than {_MAX_RANK} (a damaged file?)")

    def _read_alpha(self, f, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        """An original-Wan `.alpha`: one finite number above 0. diffusers' converter loops forever on a
        negative one, and makes zero or non-finite weights of the others."""
        if len(shape) > 1 or (shape and shape[0] != 1):
            raise LoraError(f"lora {self.name}: {key} has shape {list(shape)}; a LoRA's alpha is one number")
        alpha = f.get_tensor(key)
        value = alpha.double().item()
        if not (math.isfinite(value) and value > 0):
            raise LoraError(f"lora {self.name}: {key} is {value}; a LoRA's alpha must be a finite number above 0")
        return alpha

    def _scaling(self, header: dict) -> float:
        """PEFT's lora_alpha / r from diffusers' adapter metadata; 1.0 (alpha = rank) without it."""
        raw = header.get(_ADAPTER_METADATA)
        if not raw:
            return 1.0
        try:
            meta = {k.removeprefix(_DIFFUSERS_PREFIX): v for k, v in json.loads(raw).items()}
            r, alpha = meta["r"], meta["lora_alpha"]
            simple = not (meta.get("rank_pattern") or meta.get("alpha_pattern") or meta.get("use_dora")
                          or meta.get("use_rslora"))
            if not simple or not r:
                raise ValueError("only a plain r and lora_alpha are supported (no patterns, DoRA or rsLoRA)")
            if isinstance(r, bool) or not isinstance(r, int) or not 0 < r <= _MAX_RANK:
                raise ValueError(f"r must be a whole number in [1, {_MAX_RANK}], got {_show(r)}")
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(float(alpha)):
                raise ValueError(f"lora_alpha must be a finite number, got {_show(alpha)}")
            self._metadata_rank = r
            return float(alpha) / r
        except RecursionError:
            raise LoraError(f"lora {self.name}: adapter metadata not supported (JSON nested too deeply)") from None
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as err:
            raise LoraError(f"lora {self.name}: adapter metadata not supported ({_first_line(err)})") from None

    def _map(self, shapes: dict[str, tuple[int, ...]], alphas: dict[str, torch.Tensor]) -> dict[str, _Target]:
        keys = list(shapes)
        if any(k.startswith(_WAN_PREFIX) for k in keys):
            converted = self._convert(keys, shapes, alphas)
        elif any(k.startswith(_DIFFUSERS_PREFIX) for k in keys):
            converted = {k: (k, 1.0) for k in keys if k.startswith(_DIFFUSERS_PREFIX)}
        else:
            raise LoraError(
                f"lora {self.name}: its keys name no layer of a Wan transformer (e.g. {keys[0]!r}); expected "
                "diffusers names (transformer.blocks.N.attn1.to_q.lora_A.weight) or Wan's "
                "(diffusion_model.blocks.N.self_attn.q.lora_down.weight)"
            )
        targets: dict[str, _Target] = {}
        for name, (key, factor) in converted.items():
            name = name.removeprefix(_DIFFUSERS_PREFIX)
            module, part = next(((name[: -len(p) - 1], p) for p in _PARTS if name.endswith("." + p)), (None, None))
            if module is None:
                raise LoraError(f"lora {self.name}: {key}: not a LoRA tensor (lora_A/lora_B); "
                                "DoRA, LoKr and full-weight diffs are not supported")
            targets.setdefault(module, _Target()).parts[_PARTS[part]] = _Tensor(key, factor, shapes[key])
        for module, target in targets.items():
            if "down" not in target.parts or "up" not in target.parts:
                raise LoraError(f"lora {self.name}: {module} lacks its lora_A or lora_B weight")
        used = {t.key for target in targets.values() for t in target.parts.values()}
        dropped = [k for k in keys if k not in used and not k.endswith(".alpha")]
        if dropped:  # what diffusers' converter drops too (e.g. zeroed norm diffs)
            log.warning("lora %s: %d tensors not applied, as diffusers does not apply them (e.g. %s)",
                        self.name, len(dropped), dropped[0])
        return targets

    def _convert(self, keys, shapes, alphas) -> dict[str, tuple[str, float]]:
        """diffusers name -> (file key, factor), from diffusers' converter run on placeholders."""
        from diffusers.loaders.lora_conversion_utils import (
            _convert_non_diffusers_wan_lora_to_diffusers,
        )

        placeholders = {}
        for number, key in enumerate(keys):
            if key.endswith(".alpha"):
                placeholders[key] = alphas[key]
            else:  # rows: the rank for a lora_down (alpha / rank), one value pair per row: (number, 1)
                rows = shapes[key][0] if shapes[key] else 1
                placeholders[key] = torch.tensor([[float(number), 1.0]], dtype=torch.float64).repeat(rows, 1)
        try:
            converted = _convert_non_diffusers_wan_lora_to_diffusers(placeholders)
        except Exception as err:  # the converter's own checks: keys it does not know
            raise LoraError(f"lora {self.name}: diffusers cannot convert its Wan names "
                            f"({type(err).__name__}: {_first_line(err)})") from None
        out = {}
        for name, value in converted.items():
            pair = value.reshape(-1)[:2].tolist() if value.dtype == torch.float64 and value.dim() == 2 else None
            if pair is None or value.shape[1] != 2 or pair[1] == 0:
                raise LoraError(f"lora {self.name}: {name}: made by diffusers' converter from no single tensor "
                                "of the file; not supported")
            number, factor = round(pair[0] / pair[1]), pair[1]
            out[name] = (keys[number], factor)
        return out

    def check(self, shapes: dict[str, tuple[int, ...]], num_layers: int) -> None:
        """Every target is a linear layer of the model, and the LoRA's shapes fit it."""
        for module, target in self.targets.items():
            weight = shapes.get(module + ".weight")
            if weight is None:
                raise LoraError(f"lora {self.name}: {module} names no layer of this model "
                                f"({num_layers} blocks; another architecture?)")
            down, up = target.parts["down"].shape, target.parts["up"].shape
            fits = len(weight) == 2 and len(down) == 2 and len(up) == 2 and up[1] == down[0]
            if not fits or (up[0], down[1]) != weight:
                raise LoraError(
                    f"lora {self.name}: {module} is {'x'.join(map(str, weight))} in this model but the LoRA gives "
                    f"{'x'.join(map(str, up))} @ {'x'.join(map(str, down))} (made for another model size?)"
                )
            rank = getattr(self, "_metadata_rank", None)
            if rank is not None and down[0] != rank:
                raise LoraError(f"lora {self.name}: {module} has rank {down[0]}, its metadata says r={rank}")
            bias = target.parts.get("bias")
            if bias is not None and bias.shape != shapes.get(module + ".bias"):
                raise LoraError(f"lora {self.name}: {module}'s bias is {bias.shape}, the model's "
                                f"{shapes.get(module + '.bias')}")

    def read(self, target: _Target) -> dict[str, torch.Tensor]:
        """The tensors of one target, with the converter's factors applied as it applies them."""
        out = {}
        with safe_open(self.path, framework="pt") as f:
            for part, tensor in target.parts.items():
                value = f.get_tensor(tensor.key)
                out[part] = value * tensor.factor if tensor.factor != 1.0 else value
        return out


class LoraWeights(WeightSource):
    """A weight source whose layers come with the LoRAs' deltas fused in, layer by layer."""

    def __init__(self, base: WeightSource, loras: list[tuple[LoraFile, float]]):
        self.base = base
        self.loras = loras
        self.tensors_read = 0

    def materialize(self, module: nn.Module, prefix: str) -> None:
        self.base.materialize(module, prefix)
        params = dict(module.named_parameters())
        for lora, scale in self.loras:
            for name, target in lora.targets.items():
                weight = params.get(name.removeprefix(prefix) + ".weight") if name.startswith(prefix) else None
                if weight is None:
                    continue
                tensors = lora.read(target)
                self.tensors_read += len(tensors)
                bad = next((part for part, t in tensors.items() if not bool(torch.isfinite(t).all())), None)
                if bad is not None:  # it would make every latent NaN, found only when the first block is out
                    raise LoraError(f"lora {lora.name}: {target.parts[bad].key} holds values that are not "
                                    "finite (NaN or inf)")
                scaling = lora.scaling * scale  # PEFT's scaling, times fuse_lora's lora_scale
                bias = params.get(name.removeprefix(prefix) + ".bias")
                _fuse(weight, tensors["up"], tensors["down"], scaling)
                if "bias" in tensors:
                    _add(bias, tensors["bias"].to(bias.device, torch.float32) * scaling)


@torch.no_grad()
def _fuse(weight: torch.Tensor, up: torch.Tensor, down: torch.Tensor, scaling: float) -> None:
    """weight += (up @ down) * scaling, computed in fp32 on the weight's device, in place."""
    up = up.to(weight.device, torch.float32)
    down = down.to(weight.device, torch.float32)
    _add(weight, (up @ down) * scaling)


@torch.no_grad()
def _add(param: torch.Tensor, delta: torch.Tensor) -> None:
    if param.dtype == torch.float32:
        param.data += delta
    else:  # one layer's weight in fp32 at a time, rounded once
        param.data.copy_(param.data.float().add_(delta))


class _Shapes(WeightSource):
    """Records the names and shapes a layer asks for, leaving it on the meta device."""

    def __init__(self):
        self.shapes: dict[str, tuple[int, ...]] = {}

    def materialize(self, module: nn.Module, prefix: str) -> None:
        self.shapes.update({prefix + n: tuple(t.shape) for n, t in module.state_dict().items()})


@lru_cache(maxsize=4)
def model_shapes(config: WanConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name of the model (diffusers' names) and its shape, from layers built on meta."""
    recorder = _Shapes()
    with torch.device("meta"):
        for spec in layer_specs(config, recorder):
            spec.build()
        Conditioner(config, recorder)
    return recorder.shapes


def check_loras(specs, configs: list[WanConfig]) -> list[list[tuple[LoraFile, float]]]:
    """The LoRAs of each expert, each checked against that expert's shapes; raises LoraError."""
    per_expert: list[list[tuple[LoraFile, float]]] = [[] for _ in configs]
    for spec in specs:
        experts = EXPERTS.get(spec.expert, tuple(range(len(configs))))
        if len(configs) == 1 and spec.expert != "both":
            raise LoraError(f"lora {spec.path}: expert {spec.expert!r}, but this model has one transformer "
                            "(Wan2.1): use 'both'")
        lora = LoraFile(spec.path)
        for e in experts:
            lora.check(model_shapes(configs[e]), configs[e].num_layers)
            per_expert[e].append((lora, spec.scale))
    return per_expert


def with_loras(sources: list[WeightSource], configs: list[WanConfig], specs) -> list[WeightSource]:
    """Each expert's weight source, wrapped to fuse its LoRAs (unchanged where it has none)."""
    if not specs:
        return sources
    per_expert = check_loras(specs, configs)
    return [LoraWeights(s, loras) if loras else s for s, loras in zip(sources, per_expert)]


def tensors_read(sources: list[WeightSource]) -> int:
    """LoRA tensors this rank has read so far."""
    return sum(s.tensors_read for s in sources if isinstance(s, LoraWeights))


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
