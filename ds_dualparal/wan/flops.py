"""Counted work of one block-step (matrix products and attention), for MFU in benchmarks."""

from __future__ import annotations

from ..config import TEXT_TOKENS
from .model import WanConfig


def block_step_flops(wan: WanConfig, window_tokens: int, cached_tokens: int, batch: int, image_tokens: int = 0) -> float:
    """FLOPs of one block-step through every transformer block (2 per multiply-add).

    Per block: self-attention q, k, v, out projections and QK^T / AV over window + cached keys;
    cross-attention q, out on the window and k, v on the text, and with `image_tokens` (Wan2.1-I2V's CLIP
    tokens) their own k, v projections and attention; the two FFN matrices. The embedding,
    head and condition embedder are under 0.1% at Wan's sizes and left out.
    """
    d, n = wan.inner_dim, window_tokens
    self_attention = 4 * 2 * n * d * d + 2 * 2 * n * (n + cached_tokens) * d
    cross_attention = 2 * 2 * n * d * d + 2 * 2 * TEXT_TOKENS * d * d + 2 * 2 * n * TEXT_TOKENS * d
    if image_tokens:
        cross_attention += 2 * 2 * image_tokens * d * d + 2 * 2 * n * image_tokens * d
    ffn = 2 * 2 * n * d * wan.ffn_dim
    return float(batch * wan.num_layers * (self_attention + cross_attention + ffn))
