"""Wan's DiT as pipeline layers: patch embedding, one layer per transformer block, and the head.

Each layer is built on the meta device and then filled by a `WeightSource` with exactly its own
tensors, so a rank that builds only its stage's layers reads only their share of the checkpoint.
Parameter names inside each layer are diffusers' `WanTransformer3DModel` names below a prefix
(`blocks.{i}.` for block layers, none for the embedding and the head).

Self-attention is diffusers' `WanAttention` with a processor that adds DualParal's feature cache:
keys and values of the next block's first `c` frames, before the q/k norm and RoPE, and
window-relative rotary positions (window frames 0..|X|-1, cached frames |X|..|X|+c-1). The cache
keeps those frames' attention input and projects it when it is read: the same keys and values for
half the memory of storing both.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec
from diffusers.models.attention import FeedForward
from diffusers.models.attention_dispatch import (
    AttentionBackendName,
    dispatch_attention_fn,
)
from diffusers.models.normalization import FP32LayerNorm
from diffusers.models.transformers.transformer_wan import (
    WanRotaryPosEmbed,
    WanTimeTextImageEmbedding,
    WanTransformerBlock,
    _get_qkv_projections,
)

# diffusers keeps these in fp32 whatever the model's dtype (`_keep_in_fp32_modules`).
_FP32_NAME_PARTS = ("time_embedder", "scale_shift_table", "norm1", "norm2", "norm3")


def keeps_fp32(param_name: str) -> bool:
    return any(part in param_name.split(".") for part in _FP32_NAME_PARTS)


@dataclass(frozen=True)
class WanConfig:
    """The transformer's shape, read from a diffusers `transformer/config.json`."""

    num_layers: int
    num_attention_heads: int
    attention_head_dim: int
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    patch_size: tuple[int, int, int] = (1, 2, 2)
    cross_attn_norm: bool = True
    qk_norm: str = "rms_norm_across_heads"
    eps: float = 1e-6
    rope_max_seq_len: int = 1024
    image_dim: int | None = None  # Wan2.1-I2V: width of the CLIP image tokens its cross-attention reads
    added_kv_proj_dim: int | None = None

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_json(cls, path: str | Path) -> "WanConfig":
        raw = json.loads(Path(path).read_text())
        if raw.get("pos_embed_seq_len"):
            raise ValueError(f"{path}: first-last-frame Wan (pos_embed_seq_len) is not supported")
        names = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in raw.items() if k in names and v is not None}
        if "patch_size" in kwargs:
            kwargs["patch_size"] = tuple(kwargs["patch_size"])
        return cls(**kwargs)


class FeatureCache:
    """Per-stage store of the next block's context frames' attention input, layer by layer (their keys
    and values are projected from it when read).

    Block b+1 writes them during its forward; block b, run next in the same iteration on this
    stage, reads them. They never leave the stage.
    """

    def __init__(self):
        self._store: dict[tuple[int, int], torch.Tensor] = {}

    def put(self, layer: int, block: int, attention_input: torch.Tensor) -> None:
        self._store[(layer, block)] = attention_input

    def pop(self, layer: int, block: int) -> torch.Tensor:
        return self._store.pop((layer, block))

    def __len__(self) -> int:
        return len(self._store)


@dataclass
class AttentionWindow:
    """What one self-attention call needs beyond diffusers' arguments.

    Passed to the processor in diffusers' `rotary_emb` slot, so `WanTransformerBlock.forward` runs
    unchanged.
    """

    rope: tuple[torch.Tensor, torch.Tensor]  # cos, sin for window tokens then cached tokens
    cached: torch.Tensor | None = None  # attention input of the next block's first c frames
    capture: slice | None = None  # window tokens whose attention input this block leaves for block b-1
    captured: torch.Tensor | None = None


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved RoPE: pairs (x[2j], x[2j+1]) rotated by the angle at position j."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.type_as(x)


def fuse_qkv(attn) -> None:
    """Self-attention's q, k, v projections as one (3D x D) matmul, without a second copy of the weights.

    `to_qkv` (what diffusers' `_get_qkv_projections` uses once `fused_projections` is set) holds the
    weights; `to_q`, `to_k`, `to_v` become views of its rows, so the feature cache can still project
    keys and values alone. Only for the compiled path (`compile`): a wider matmul may round differently.
    """
    parts = (attn.to_q, attn.to_k, attn.to_v)
    with torch.device("meta"):
        fused = nn.Linear(attn.to_q.in_features, sum(p.out_features for p in parts))
    fused.weight = nn.Parameter(torch.cat([p.weight for p in parts]), requires_grad=False)
    fused.bias = nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=False)
    rows = [p.out_features for p in parts]
    for part, weight, bias in zip(parts, fused.weight.split(rows), fused.bias.split(rows)):
        part.weight = nn.Parameter(weight, requires_grad=False)
        part.bias = nn.Parameter(bias, requires_grad=False)
    attn.to_qkv = fused
    attn.fused_projections = True


def _cached_key_value(attn, cached: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if attn.fused_projections:  # k and v rows of the fused weight: one matmul
        dim = attn.to_q.out_features
        return F.linear(cached, attn.to_qkv.weight[dim:], attn.to_qkv.bias[dim:]).chunk(2, dim=-1)
    return attn.to_k(cached), attn.to_v(cached)


# FlashAttention 4: the CuTe kernels of the `flash-attn-4` package (`flash_attn.cute`), called directly
# (diffusers offers them only as a kernel downloaded from the Hub). Self-attention only; the
# cross-attention (512 text tokens) keeps diffusers' default.
FLASH_4 = "flash_4"


def flash_4_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """(batch, tokens, heads, head_dim) in, the same layout out, as diffusers' backends."""
    from flash_attn.cute import flash_attn_func

    out = flash_attn_func(query, key, value)
    return out[0] if isinstance(out, tuple) else out  # some versions also return the log-sum-exp


def _attend(query, key, value, backend: str | None) -> torch.Tensor:
    if backend == FLASH_4:
        return flash_4_attention(query, key, value)
    return dispatch_attention_fn(query, key, value, backend=AttentionBackendName(backend) if backend else None)


@torch.compiler.disable
def _attention(query, key, value, backend):
    # Outside the compiled graph: eager SDPA keeps the backend PyTorch picks for these shapes (cuDNN on
    # an H200, ~575 TFLOP/s), which the compiled graph did not (~10% slower, measured).
    return _attend(query, key, value, backend)


@torch.library.custom_op("ds_dualparal::window_attention", mutates_args=())
def window_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, backend: str) -> torch.Tensor:
    """The same attention as an opaque operator: `torch.compile` keeps it in the block's one graph (no graph
    break) and calls the eager kernel, so the backend PyTorch picks is kept. Contiguous (batch, tokens,
    heads, head_dim) out, as the fake below promises the compiler."""
    return _attend(query, key, value, backend or None).contiguous()


@window_attention.register_fake
def _window_attention_shape(query, key, value, backend):
    return query.new_empty(*query.shape[:-1], value.shape[-1])


class WindowAttnProcessor:
    """Self-attention of a window over itself plus the cached frames of the next block."""

    def __init__(self, backend: str | None = None, in_graph: bool = False):
        self.backend = backend  # a diffusers backend's name, FLASH_4, or None (diffusers' default)
        self.in_graph = in_graph  # through `window_attention`: one compiled graph for the whole block

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        window: AttentionWindow = rotary_emb
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        if window.capture is not None:
            window.captured = hidden_states[:, window.capture].clone()  # not a view: frees the window
        if window.cached is not None:
            cached_key, cached_value = _cached_key_value(attn, window.cached)
            key = torch.cat([key, cached_key], dim=1)
            value = torch.cat([value, cached_value], dim=1)
        num_query = query.shape[1]
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        cos, sin = window.rope
        query = apply_rotary(query, cos[:, :num_query], sin[:, :num_query])
        key = apply_rotary(key, cos[:, : key.shape[1]], sin[:, : key.shape[1]])
        if self.in_graph:
            out = window_attention(query, key, value, self.backend or "")
        else:
            out = _attention(query, key, value, self.backend)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


@dataclass
class WindowState:
    """One block-step's tensors as they pass through a stage's layers.

    Only `hidden` crosses from stage to stage; everything else each stage makes for itself.
    """

    block: int
    grid: tuple[int, int, int]  # window frames, height and width in patches
    own_frames: int  # the block's own frames: the last ones of the window
    guidance: float | None  # None: no classifier-free guidance (batch of 1)
    temb: torch.Tensor
    timestep_proj: torch.Tensor
    text: torch.Tensor  # the projected image tokens (Wan2.1-I2V) then the projected text, as diffusers joins them
    rope: tuple[torch.Tensor, torch.Tensor]
    cache: FeatureCache
    read_cache: bool = False  # attend to block+1's cached frames
    capture: tuple[int, int] | None = None  # [start, stop) tokens whose attention input block-1 reads
    latents: torch.Tensor | None = None  # window input on the first stage
    hidden: torch.Tensor | None = None
    pred: torch.Tensor | None = None


class WeightSource(ABC):
    """Fills a meta-built layer with real tensors (see `ds_dualparal.wan.weights`)."""

    @abstractmethod
    def materialize(self, module: nn.Module, prefix: str) -> None:
        """Give every parameter of `module` its tensor, named `prefix + name` in the checkpoint."""


def _materialized(module: nn.Module, weights: WeightSource, prefix: str) -> nn.Module:
    weights.materialize(module, prefix)
    return module.eval().requires_grad_(False)


class WanEmbedLayer(nn.Module):
    """Patch embedding: window latents (batch, C, f, h, w) -> tokens (batch, f*h/2*w/2, D)."""

    def __init__(self, config: WanConfig, weights: WeightSource):
        super().__init__()
        with torch.device("meta"):
            self.patch_embedding = nn.Conv3d(
                config.in_channels, config.inner_dim, kernel_size=config.patch_size, stride=config.patch_size
            )
        _materialized(self, weights, "")

    def forward(self, state: WindowState) -> WindowState:
        latents = state.latents.to(self.patch_embedding.weight.dtype)
        state.hidden = self.patch_embedding(latents).flatten(2).transpose(1, 2).contiguous()
        state.latents = None
        return state


class ChunkedFeedForward(FeedForward):
    """diffusers' FeedForward applied to at most `chunk` tokens at a time.

    Token-wise, so the result is the same; the (tokens x ffn_dim) intermediate, the largest
    activation of a block, shrinks to a chunk's.
    """

    chunk = 8192

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if hidden_states.shape[1] <= self.chunk:
            return super().forward(hidden_states, *args, **kwargs)
        parts = hidden_states.split(self.chunk, dim=1)
        return torch.cat([super(ChunkedFeedForward, self).forward(p, *args, **kwargs) for p in parts], dim=1)


class WanBlockLayer(WanTransformerBlock):
    """One Wan transformer block, run by diffusers' own forward with the windowed self-attention.

    `compile=True` (the `compile` setting; its default on CUDA) fuses the q/k/v projections and runs the block through
    `torch.compile`: per window shape, shared by every layer of the stage, the graphs around the
    self-attention, which runs eagerly between them (four: the break splits each frame it passes
    through), or, with `attention_in_graph`, one graph that calls the attention as the opaque operator
    `window_attention` (measured 1% slower on an H200, BENCHMARKS.md, so not the engine's choice).
    """

    def __init__(self, config: WanConfig, index: int, weights: WeightSource, backend: str | None = None,
                 compile: bool = False, attention_in_graph: bool = False):
        with torch.device("meta"):
            super().__init__(
                config.inner_dim,
                config.ffn_dim,
                config.num_attention_heads,
                config.qk_norm,
                config.cross_attn_norm,
                config.eps,
                config.added_kv_proj_dim,
            )
            self.ffn = ChunkedFeedForward(config.inner_dim, inner_dim=config.ffn_dim, activation_fn="gelu-approximate")
        self.index = index
        self.attn1.set_processor(WindowAttnProcessor(in_graph=compile and attention_in_graph))
        self.set_attention_backend(backend)
        _materialized(self, weights, f"blocks.{index}.")
        self._compute = self._block
        if compile:
            fuse_qkv(self.attn1)
            self._compute = torch.compile(self._block, dynamic=False)

    def set_attention_backend(self, backend: str | None) -> None:
        """Self- and cross-attention through this diffusers backend (None: diffusers' default); FLASH_4:
        the self-attention through FlashAttention 4, the cross-attention through diffusers' default."""
        diffusers_name = AttentionBackendName(backend) if backend and backend != FLASH_4 else None
        self.attn1.processor.backend = backend or None
        self.attn2.processor._attention_backend = diffusers_name

    def _block(self, hidden, text, timestep_proj, rope, cached, capture):
        window = AttentionWindow(rope=rope, cached=cached, capture=None if capture is None else slice(*capture))
        hidden = super().forward(hidden, text, timestep_proj, window)
        return hidden, window.captured

    def forward(self, state: WindowState) -> WindowState:
        cached = state.cache.pop(self.index, state.block + 1) if state.read_cache else None
        state.hidden, captured = self._compute(state.hidden, state.text, state.timestep_proj, state.rope, cached,
                                               state.capture)
        if captured is not None:
            state.cache.put(self.index, state.block, captured)
        return state


class WanHeadLayer(nn.Module):
    """norm_out, proj_out and unpatchify of the block's own frames, then the CFG combine."""

    def __init__(self, config: WanConfig, weights: WeightSource):
        super().__init__()
        self.config = config
        with torch.device("meta"):
            self.norm_out = FP32LayerNorm(config.inner_dim, config.eps, elementwise_affine=False)
            self.proj_out = nn.Linear(config.inner_dim, config.out_channels * math.prod(config.patch_size))
            self.scale_shift_table = nn.Parameter(torch.empty(1, 2, config.inner_dim))
        _materialized(self, weights, "")

    def forward(self, state: WindowState) -> WindowState:
        frames, height, width = state.grid
        own_tokens = state.own_frames * height * width
        hidden = state.hidden[:, -own_tokens:]
        if state.temb.ndim == 3:  # per-token timesteps (a clean first frame): the own tokens' modulation
            own_temb = state.temb[:, -own_tokens:].unsqueeze(2)
            shift, scale = (self.scale_shift_table.unsqueeze(0) + own_temb).chunk(2, dim=2)
            shift, scale = shift.squeeze(2), scale.squeeze(2)
        else:
            shift, scale = (self.scale_shift_table + state.temb.unsqueeze(1)).chunk(2, dim=1)
        hidden = (self.norm_out(hidden.float()) * (1 + scale) + shift).type_as(hidden)
        hidden = self.proj_out(hidden)
        p_t, p_h, p_w = self.config.patch_size
        batch = hidden.shape[0]
        hidden = hidden.reshape(batch, state.own_frames, height, width, p_t, p_h, p_w, -1)
        out = hidden.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)
        if state.guidance is None:
            state.pred = out
        else:
            cond, uncond = out.chunk(2)
            state.pred = uncond + state.guidance * (cond - uncond)
        state.hidden = None
        return state


class Conditioner(nn.Module):
    """The condition embedder and RoPE tables that every stage keeps (small, replicated)."""

    def __init__(self, config: WanConfig, weights: WeightSource):
        super().__init__()
        self.config = config
        self.rope = WanRotaryPosEmbed(config.attention_head_dim, config.patch_size, config.rope_max_seq_len)
        with torch.device("meta"):
            self.condition_embedder = WanTimeTextImageEmbedding(
                dim=config.inner_dim,
                time_freq_dim=config.freq_dim,
                time_proj_dim=config.inner_dim * 6,
                text_embed_dim=config.text_dim,
                image_embed_dim=config.image_dim,
            )
        weights.materialize(self.condition_embedder, "condition_embedder.")
        self.eval().requires_grad_(False)

    def rotary(self, frames: int, height: int, width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE for `frames` patch-frames at window-relative positions 0..frames-1."""
        p_t, p_h, p_w = self.config.patch_size
        shape_only = torch.empty((1, 0, frames * p_t, height * p_h, width * p_w), device="meta")
        cos, sin = self.rope(shape_only)
        return cos.to(device), sin.to(device)

    def embed(self, timestep: torch.Tensor, text: torch.Tensor, image: torch.Tensor | None = None,
              timestep_seq_len: int | None = None):
        """Returns temb, timestep_proj (batch, 6, D) and the projected text (after the projected image
        tokens, if any), as diffusers' forward does. With `timestep_seq_len`, `timestep` holds one value
        per token (batch * seq_len): temb is (batch, seq_len, D) and timestep_proj (batch, seq_len, 6, D)."""
        return (*self.embed_time(timestep, text.dtype, timestep_seq_len), self.embed_text(text, image))

    def embed_time(self, timestep: torch.Tensor, dtype: torch.dtype, timestep_seq_len: int | None = None):
        """The time half of `embed`: temb and timestep_proj, in the operations of diffusers' forward
        (`dtype`: the text's, which diffusers casts temb to). Apart from the text half, so that a
        generation computes each once per thing it depends on (denoise.WindowBuilder)."""
        embedder = self.condition_embedder
        timestep = embedder.timesteps_proj(timestep)
        if timestep_seq_len is not None:
            timestep = timestep.unflatten(0, (-1, timestep_seq_len))
        temb = embedder.time_embedder(timestep.to(embedder.time_embedder.linear_1.weight.dtype)).to(dtype)
        return temb, embedder.time_proj(embedder.act_fn(temb)).unflatten(-1, (6, -1))

    def embed_text(self, text: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        """The text half of `embed`: the projected image tokens (if any), then the projected text."""
        embedder = self.condition_embedder
        text = embedder.text_embedder(text)
        if image is not None:
            text = torch.cat([embedder.image_embedder(image), text], dim=1)
        return text


def layer_specs(config: WanConfig, weights: WeightSource, backend: str | None = None,
                compile: bool = False) -> list[LayerSpec]:
    """The DiT as a flat list of lazily built layers: embedding, one per block, head."""
    return (
        [LayerSpec(WanEmbedLayer, config, weights)]
        + [LayerSpec(WanBlockLayer, config, i, weights, backend, compile) for i in range(config.num_layers)]
        + [LayerSpec(WanHeadLayer, config, weights)]
    )
