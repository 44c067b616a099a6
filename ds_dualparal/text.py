"""Prompt embeddings with Wan's UMT5 encoder, through diffusers' own `WanPipeline.encode_prompt`."""

from __future__ import annotations

import gc
from pathlib import Path

import torch

MAX_SEQUENCE_LENGTH = 512


def encode_prompts(
    model_path: Path, prompt: str, negative_prompt: str, cfg: bool, device, dtype: torch.dtype
) -> torch.Tensor:
    """Returns (2, 512, text_dim) [cond; uncond] with CFG, else (1, 512, text_dim).

    The encoder is loaded, used once and freed before denoising starts.
    """
    from diffusers import WanPipeline
    from transformers import AutoTokenizer, UMT5EncoderModel

    tokenizer = AutoTokenizer.from_pretrained(model_path / "tokenizer")
    encoder = UMT5EncoderModel.from_pretrained(model_path / "text_encoder", dtype=dtype).to(device)
    # Only the text half of the pipeline is built; encode_prompt touches nothing else.
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=None, scheduler=None)
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(
            prompt=prompt,
            negative_prompt=negative_prompt,
            do_classifier_free_guidance=cfg,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
            device=torch.device(device),
            dtype=dtype,
        )
    del pipe, encoder
    gc.collect()
    return torch.cat([cond, uncond]) if cfg else cond
