"""Where layer tensors come from: a diffusers model folder of safetensors, or seeded random values.

Only safetensors are read (never pickles). A component folder (e.g. `transformer/`) holds one
`diffusion_pytorch_model.safetensors` or shards listed by its `.index.json`; a layer asks for its
own keys and only the shards that hold them are opened.
"""

from __future__ import annotations

import functools
import json
import zlib
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open

from .model import WeightSource, keeps_fp32

# The embedded default model (`launch/train_tiny.py` made it), shipped with the package.
TINY_WAN_PATH = Path(__file__).resolve().parents[1] / "assets" / "tiny-wan"
_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


class ModelError(ValueError):
    """A model folder that cannot be loaded; the message names the file and what is wrong."""


class SafetensorsFolder:
    """Random access to the tensors of one diffusers component folder (e.g. `transformer/`)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / f"{_WEIGHTS_NAME}.index.json"
        single = self.folder / _WEIGHTS_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as err:
                raise ModelError(f"{index}: not a safetensors index with a 'weight_map' ({err})") from None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ModelError(f"{index}: 'weight_map' must map tensor names to file names")
            self._file_of = {key: self.folder / name for key, name in weight_map.items()}
        elif single.is_file():
            with safe_open(single, framework="pt") as f:
                self._file_of = {key: single for key in f.keys()}
        else:
            raise ModelError(f"{self.folder}: no {_WEIGHTS_NAME} or {_WEIGHTS_NAME}.index.json")
        self.tensors_read = 0

    def keys(self) -> list[str]:
        return list(self._file_of)

    def read(self, keys: list[str], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        missing = [k for k in keys if k not in self._file_of]
        if missing:
            raise ModelError(f"{self.folder}: missing tensors {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self._file_of[key], []).append(key)
        out = {}
        for path, file_keys in by_file.items():
            if not path.is_file():
                raise ModelError(f"{path}: shard listed in the index is missing")
            with safe_open(path, framework="pt", device=str(device)) as f:
                for key in file_keys:
                    out[key] = f.get_tensor(key)
        self.tensors_read += len(out)
        return out


def _cast(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(torch.float32 if keeps_fp32(name) else dtype)


class FolderWeights(WeightSource):
    """Loads a layer's tensors from a transformer's safetensors folder, cast to `dtype` (fp32 where diffusers keeps it)."""

    def __init__(self, folder: str | Path, dtype: torch.dtype, device: torch.device | str):
        self.safetensors = SafetensorsFolder(folder)
        self.dtype = dtype
        self.device = torch.device(device)

    def materialize(self, module: nn.Module, prefix: str) -> None:
        names = list(module.state_dict().keys())
        tensors = self.safetensors.read([prefix + n for n in names], device="cpu")
        state = {n: _cast(n, tensors[prefix + n], self.dtype).to(self.device) for n in names}
        for name, tensor in state.items():
            expected = module.state_dict()[name].shape
            if tensor.shape != expected:
                raise ModelError(
                    f"{self.safetensors.folder}: tensor {prefix + name} has shape {tuple(tensor.shape)}, "
                    f"the config expects {tuple(expected)}"
                )
        module.load_state_dict(state, strict=True, assign=True)


class RandomWeights(WeightSource):
    """Seeded random tensors of a layer's shapes (benchmarks of full-size models without a download).

    Each tensor's values depend only on (seed, its tensor name), never on the partition.
    """

    def __init__(self, seed: int, dtype: torch.dtype, device: torch.device | str):
        self.seed = seed
        self.dtype = dtype
        self.device = torch.device(device)

    def materialize(self, module: nn.Module, prefix: str) -> None:
        state = {}
        for name, meta in module.state_dict().items():
            generator = torch.Generator(device=self.device)
            generator.manual_seed(self.seed * 1_000_003 + zlib.crc32((prefix + name).encode()))
            fan_in = meta[0].numel() if meta.dim() > 1 else meta.numel()
            values = torch.randn(meta.shape, generator=generator, device=self.device) / max(1, fan_in) ** 0.5
            if meta.dim() == 1:  # norm scales start at one, biases at zero
                values.fill_(1.0 if name.endswith("weight") else 0.0)
            state[name] = _cast(name, values, self.dtype)
        module.load_state_dict(state, strict=True, assign=True)


class ModelFolder:
    """A diffusers-format Wan text-to-video folder: transformer(s), VAE, text encoder, tokenizer, scheduler."""

    COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")

    def __init__(self, path: str | Path, need: tuple[str, ...] = COMPONENTS):
        self.path = Path(path)
        if not self.path.is_dir():
            what = "is not a folder" if self.path.exists() else "does not exist"
            raise ModelError(f"model folder {self.path} {what}")
        index_file = self.path / "model_index.json"
        try:
            self.index = json.loads(index_file.read_text()) if index_file.is_file() else {}
        except (ValueError, OSError) as err:
            raise ModelError(f"{index_file}: invalid JSON ({err})") from None
        if not isinstance(self.index, dict):
            raise ModelError(f"{index_file}: must be a JSON object")
        for name in need:
            if not (self.path / name).is_dir():
                raise ModelError(f"model folder {self.path} has no '{name}' component")
        experts = ["transformer"]
        second = self.index.get("transformer_2")
        if second and isinstance(second, list) and second[0] is not None:
            experts.append("transformer_2")
        self.experts = [self.path / name for name in experts]
        for folder in self.experts:
            if not (folder / "config.json").is_file():
                raise ModelError(f"model folder {self.path}: {folder.name}/config.json is missing")
        ratio = self.index.get("boundary_ratio")
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1):
            raise ModelError(f"{index_file}: boundary_ratio {ratio!r} must be a number in [0, 1]")
        self.boundary_ratio = float(ratio) if ratio is not None and len(self.experts) == 2 else None


def resolve_model(model: str | None) -> Path:
    """A local folder as given, the embedded tiny model for None, else a hub id to download."""
    if model is None:
        return TINY_WAN_PATH
    path = Path(model).expanduser()
    if path.exists() or model.startswith((".", "/", "~")):
        return path
    return _download(model)


@functools.lru_cache(maxsize=None)
def _download(model: str) -> Path:
    """A hub id's snapshot, asked of the hub once per process (a failure is not kept: the next call asks
    again). The checks, the cost estimate and the load each resolve the model, four times on rank 0
    before its first block-step, and every `snapshot_download` is a request to the hub even when the
    files are cached; once also means that all of them read the same revision."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model))
    except Exception as err:  # offline, unknown repo, no permission: all one message for the user
        raise ModelError(f"model {model!r}: not a local folder and could not be downloaded ({err})") from None
