"""Write tiny random image-to-video Wan pipelines in diffusers format, so tests need no download.

    python -m ds_dualparal.toy.tiny_i2v OUT_DIR --kind i2v|i2v-a14b|ti2v [--layers N] [--seed S]

Three kinds, shaped like the real models at a tiny width:

- ``i2v`` (Wan2.1-I2V): the transformer takes 36 channels (16 latent + 4 mask + 16 condition) and image
  tokens in its cross-attention (``image_dim``, ``added_kv_proj_dim``); ``image_encoder/`` is a tiny
  ``CLIPVisionModel`` and ``image_processor/`` its ``CLIPImageProcessor``, as ``WanImageToVideoPipeline``
  loads them; the VAE is Wan2.1's (z 16, 8x spatial).
- ``i2v-a14b`` (Wan2.2-I2V-A14B): the same 36-channel input without CLIP, two experts (``transformer_2``)
  and a ``boundary_ratio``.
- ``ti2v`` (Wan2.2-TI2V-5B): ``expand_timesteps`` in ``model_index.json``, the Wan2.2 VAE (z 48, residual
  blocks, a 2x2 patchify in front, so 16x spatial in all) and a transformer of 48 channels in and out.
"""

from __future__ import annotations

import argparse
import logging
import pathlib

import torch

from ..config import WAN22_BOUNDARY_RATIO
from ..report import stdout_report
from .tiny import (
    _VAE_CONFIG,
    _seeded,
    _tiny_transformer_config,
    build_scheduler,
    build_text_encoder,
    build_tokenizer,
    save_pipeline,
)

logger = logging.getLogger(__name__)

KINDS = ("i2v", "i2v-a14b", "ti2v")

# A ViT of 2 layers over 32x32 pixels in 8x8 patches: 16 patches + the class token = 17 image tokens.
_CLIP_CONFIG = dict(
    hidden_size=16,
    intermediate_size=32,
    projection_dim=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_channels=3,
    image_size=32,
    patch_size=8,
)
# Wan2.2's VAE as diffusers configures it (z 48, residual, patchify 2, 16x), at a tiny width.
_VAE22_LATENTS = 48
_VAE22_CONFIG = dict(
    base_dim=8,
    decoder_base_dim=12,
    z_dim=_VAE22_LATENTS,
    dim_mult=[1, 2, 2, 2],
    num_res_blocks=1,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    is_residual=True,
    in_channels=12,
    out_channels=12,
    patch_size=2,
    scale_factor_temporal=4,
    scale_factor_spatial=16,
    # Not the identity, so that a forgotten (un)normalization shows in the tests.
    latents_mean=[round(0.05 * ((i % 7) - 3), 3) for i in range(_VAE22_LATENTS)],
    latents_std=[round(0.8 + 0.1 * (i % 5), 3) for i in range(_VAE22_LATENTS)],
)


def _i2v_transformer_config(num_layers: int) -> dict:
    config = _tiny_transformer_config(num_layers)
    inner_dim = config["num_attention_heads"] * config["attention_head_dim"]
    latent = config["out_channels"]
    return {**config, "in_channels": 2 * latent + 4, "image_dim": _CLIP_CONFIG["hidden_size"],
            "added_kv_proj_dim": inner_dim}


def _i2v_a14b_transformer_config(num_layers: int) -> dict:
    config = _i2v_transformer_config(num_layers)
    return {**config, "image_dim": None, "added_kv_proj_dim": None}


def _ti2v_transformer_config(num_layers: int) -> dict:
    return {**_tiny_transformer_config(num_layers), "in_channels": _VAE22_LATENTS, "out_channels": _VAE22_LATENTS}


def _clip_processor():
    from transformers import CLIPImageProcessor

    size = _CLIP_CONFIG["image_size"]
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def write_tiny_i2v(path, *, kind: str, seed: int = 0, num_layers: int = 2) -> pathlib.Path:
    """Write a tiny random fp32 image-to-video Wan pipeline of `kind` ('i2v' or 'ti2v') to `path`;
    the same arguments give byte-identical weights."""
    from diffusers import AutoencoderKLWan, WanImageToVideoPipeline, WanTransformer3DModel
    from transformers import CLIPVisionConfig, CLIPVisionModel

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    config = {"i2v": _i2v_transformer_config, "i2v-a14b": _i2v_a14b_transformer_config,
              "ti2v": _ti2v_transformer_config}[kind](num_layers)
    transformer = _seeded(seed, lambda: WanTransformer3DModel(**config))
    two_experts = kind == "i2v-a14b"
    transformer_2 = _seeded(seed + 1, lambda: WanTransformer3DModel(**config)) if two_experts else None
    boundary_ratio = WAN22_BOUNDARY_RATIO if two_experts else None
    vae = _seeded(seed + 2, lambda: AutoencoderKLWan(**(_VAE22_CONFIG if kind == "ti2v" else _VAE_CONFIG)))
    text_encoder = build_text_encoder(seed + 3)
    tokenizer, scheduler = build_tokenizer(), build_scheduler()
    path = save_pipeline(path, transformer=transformer, transformer_2=transformer_2, boundary_ratio=boundary_ratio,
                         vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
    if two_experts:
        pipe = WanImageToVideoPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                                       transformer=transformer, transformer_2=transformer_2,
                                       boundary_ratio=boundary_ratio)
    elif kind == "i2v":
        image_encoder = _seeded(seed + 4, lambda: CLIPVisionModel(CLIPVisionConfig(**_CLIP_CONFIG)))
        image_processor = _clip_processor()
        image_encoder.save_pretrained(path / "image_encoder")
        image_processor.save_pretrained(path / "image_processor")
        pipe = WanImageToVideoPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                                       image_processor=image_processor, image_encoder=image_encoder,
                                       transformer=transformer)
    else:
        from diffusers import WanPipeline

        # Wan2.2-TI2V-5B ships as a WanPipeline with expand_timesteps; its image path is WanImageToVideoPipeline's.
        pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                           transformer=transformer, expand_timesteps=True)
    pipe.save_config(path)  # model_index.json, over the text-to-video one save_pipeline wrote
    logger.info("wrote tiny Wan %s (%d layers, seed=%d) to %s", kind, num_layers, seed, path)
    return path


def main(argv=None) -> int:
    """CLI: write a tiny image-to-video Wan checkpoint to OUT_DIR."""
    parser = argparse.ArgumentParser(prog="python -m ds_dualparal.toy.tiny_i2v", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=pathlib.Path)
    parser.add_argument("--kind", choices=KINDS, required=True,
                        help="i2v: Wan2.1-I2V; i2v-a14b: Wan2.2-I2V-A14B; ti2v: Wan2.2-TI2V-5B")
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.layers < 1:
        parser.error(f"--layers must be >= 1, got {args.layers}")
    with torch.no_grad():
        out = write_tiny_i2v(args.out_dir, kind=args.kind, seed=args.seed, num_layers=args.layers)
    stdout_report("ds_dualparal.toy.tiny_i2v.report").info("%s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
