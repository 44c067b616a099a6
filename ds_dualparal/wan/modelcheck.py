"""Everything about a model folder that can be found wrong before any weights load, and its fingerprint.

`check_model_folder(path)` reads only small things: each component's JSON configs, and the header of
every safetensors file (the tensors' names, dtypes, shapes and byte ranges) checked against the file's
size, so a truncated shard or VAE is refused in one line before the run starts rather than after
denoising. Weights load only from safetensors: a `vae/` or `text_encoder/` with only `.bin` files is
refused here too.

`weights_fingerprint(path)` is what a checkpoint's fingerprint uses for the model: the content of
what determines the latents (see its docstring).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

from ..files import DuplicateKeyError, no_duplicate_keys
from .weights import ModelError, ModelFolder

MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
# the safetensors file (or index) each component loads, by the library's naming
WEIGHTS = {
    "transformer": "diffusion_pytorch_model.safetensors",
    "transformer_2": "diffusion_pytorch_model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
    "image_encoder": "model.safetensors",
}
SAMPLES, SAMPLE_BYTES = 16, 64 * 2**10


def read_json(path: Path, what: str = "a JSON object") -> dict:
    try:
        value = json.loads(path.read_bytes().decode("utf-8"), object_pairs_hook=no_duplicate_keys)
    except FileNotFoundError:
        raise ModelError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        detail = str(err) if isinstance(err, DuplicateKeyError) else getattr(err, "strerror", None) or err
        raise ModelError(f"{path}: not valid JSON ({' '.join(str(detail).splitlines())})") from None
    if not isinstance(value, dict):
        raise ModelError(f"{path}: must be {what}")
    return value


def safetensors_header(path: Path) -> bytes:
    """The raw JSON header of a safetensors file, after checking that every tensor's bytes are in the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than a header")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER_BYTES or 8 + length > size:
                raise ValueError(f"header of {length} bytes does not fit in the file's {size}")
            raw = f.read(length)
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        end = 0
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, stop = info["data_offsets"]
            count = 1
            for dim in info["shape"]:
                count *= int(dim)
            if not (isinstance(begin, int) and isinstance(stop, int) and 0 <= begin <= stop):
                raise ValueError(f"tensor {name}: bad data_offsets")
            if stop - begin != count * DTYPE_BYTES.get(info["dtype"], 0):
                raise ValueError(f"tensor {name}: {stop - begin} bytes for shape {info['shape']} {info['dtype']}")
            end = max(end, stop)
        if 8 + length + end != size:
            raise ValueError(f"the tensors need {8 + length + end} bytes, the file has {size} (truncated?)")
    except OSError as err:
        raise ModelError(f"{path}: cannot read ({err.strerror or err})") from None
    except (ValueError, KeyError, TypeError, struct.error, RecursionError) as err:
        raise ModelError(f"{path}: not a whole safetensors file ({err})") from None
    return raw


def weight_files(folder: Path, name: str) -> list[Path]:
    """The safetensors files of one component: `name`, or the shards its `name.index.json` lists."""
    index = folder / f"{name}.index.json"
    single = folder / name
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelError(f"{index}: 'weight_map' must be a non-empty mapping of tensor names to files")
        shards = set()
        for key, shard in weight_map.items():
            if not isinstance(shard, str) or Path(shard).name != shard or shard in (".", ".."):
                raise ModelError(f"{index}: tensor {key!r} maps to {shard!r}, not a file name in {folder}")
            shards.add(shard)
        files = [folder / shard for shard in sorted(shards)]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise ModelError(f"{missing[0]}: shard listed in the index is missing")
        return files
    if single.is_file():
        return [single]
    others = sorted(p.name for p in folder.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    hint = f" (found {', '.join(others[:3])}: only safetensors are loaded, never pickles)" if others else ""
    raise ModelError(f"{folder}: no {name} or {name}.index.json{hint}")


def check_model_folder(path: Path) -> ModelFolder:
    """The model folder, checked as far as it can be without loading weights (raises ModelError)."""
    from .model import WanConfig

    if path.exists() and not path.is_dir():
        raise ModelError(f"model folder {path} is not a folder")
    folder = ModelFolder(path)
    if not isinstance(folder.index, dict):
        raise ModelError(f"{path / 'model_index.json'}: must be a JSON object")
    for expert in folder.experts:
        config = expert / "config.json"
        read_json(config)
        try:
            wan = WanConfig.from_json(config)
            if min(wan.num_layers, wan.num_attention_heads, wan.attention_head_dim, wan.in_channels) < 1:
                raise ValueError("sizes must be positive")
        except ModelError:
            raise
        except (ValueError, TypeError) as err:
            raise ModelError(f"{config}: not a Wan transformer config ({' '.join(str(err).splitlines())})") from None
    for component in [e.name for e in folder.experts] + ["vae", "text_encoder"]:
        read_json(path / component / "config.json")
        for file in weight_files(path / component, WEIGHTS[component]):
            safetensors_header(file)
    if wan.image_dim:  # Wan2.1-I2V reads CLIP tokens: its image encoder and processor
        read_json(path / "image_encoder" / "config.json")
        for file in weight_files(path / "image_encoder", "model.safetensors"):
            safetensors_header(file)
        read_json(path / "image_processor" / "preprocessor_config.json")
    for file in sorted((path / "tokenizer").glob("*.json")):
        read_json(file)
    if not any((path / "tokenizer").iterdir()):
        raise ModelError(f"{path / 'tokenizer'}: is empty")
    scheduler = path / "scheduler" / "scheduler_config.json"
    if scheduler.exists():
        read_json(scheduler)
    return folder


def weights_fingerprint(path: Path, components: tuple[str, ...] | None = None) -> str:
    """sha256 of what in the model folder determines the latents, read cheaply.

    Covered: the transformer(s)' and text encoder's safetensors files, each by its header (every
    tensor's name, dtype, shape and byte range), its size, and 16 samples of 64 KiB spread evenly over
    its bytes (first and last included); their config.json; the tokenizer's files; the scheduler config.
    About 1 MiB read per file whatever its size, so a 14B model costs well under a second. Not the VAE:
    it decodes the latents but does not make them. Not paths or mtimes: a copied or moved model
    resumes, a different one (other weights, even of the same shapes) does not. A change confined to
    bytes between the samples of a file of unchanged size goes unseen; a full hash of tens of GB per
    start would cost minutes.

    `components` (those of them the folder has) instead of the transformers, text encoder, tokenizer and
    scheduler: e.g. the VAE and image encoder, which make an image-to-video run's condition.
    """
    folder = ModelFolder(path)
    sha = hashlib.sha256()

    def add(label: str, data: bytes) -> None:
        sha.update(f"{label}:{len(data)}:".encode())
        sha.update(data)

    if components is not None:
        for component in components:
            if (path / component).is_dir():
                _add_component(add, path, component)
        return sha.hexdigest()
    for component in [e.name for e in folder.experts] + ["text_encoder"]:
        _add_component(add, path, component)
    for file in sorted((path / "tokenizer").glob("*")) + [path / "scheduler" / "scheduler_config.json"]:
        if file.is_file():
            add(os.path.relpath(file, path), file.read_bytes())
    return sha.hexdigest()


def _add_component(add, path: Path, component: str) -> None:
    """A component's safetensors (header, size, samples) and config.json, through `add(label, bytes)`."""
    for file in weight_files(path / component, WEIGHTS[component]):
        add(f"{component}/{file.name}/header", safetensors_header(file))
        size = file.stat().st_size
        with open(file, "rb") as f:
            for n in range(SAMPLES):
                offset = max(0, (size - SAMPLE_BYTES) * n // (SAMPLES - 1))
                f.seek(offset)
                add(f"{component}/{file.name}@{offset}", f.read(SAMPLE_BYTES))
    add(f"{component}/config.json", (path / component / "config.json").read_bytes())
