"""Write a tiny random Wan2.1-T2V pipeline in diffusers format, so demos and tests need no download.

    python -m ds_dualparal.toy.tiny OUT_DIR [--two-experts] [--layers N] [--seed S]
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import shutil

import torch

from ..config import TEXT_TOKENS, WAN22_BOUNDARY_RATIO
from ..report import stdout_report
from . import toyvideo

logger = logging.getLogger(__name__)


TEXT_DIM = 32
# Small enough that even the tiny transformer is written as several shards, as real Wan checkpoints are.
TRANSFORMER_SHARD_SIZE = "40KB"

# Special tokens first so that their ids are UMT5's: pad 0, eos 1, unk 2.
_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")
_CORPUS = (
    "a cat walks on the grass in the garden",
    "a dog runs along the beach at sunset, waves crash on the shore",
    "an astronaut rides a horse on the moon",
    "a red car drives through a city street at night with neon lights",
    "a bird flies over a mountain lake under a blue sky",
    "close up of a flower in the rain, slow motion",
    "two people dance in a room while the camera moves slowly",
    "a boat sails across the sea and clouds drift by",
    "the forest is green and the river flows between the trees",
    "bright colors, high quality, static, blurry, worst quality, low quality, jpeg artifacts",
    "a panda eats bamboo and a fox sleeps in the snow",
    "time lapse of a busy road, people walking, many cars",
)
# The toy videos' words (ds_dualparal.toy.toyvideo), appended after the sentences above so that their ids,
# assigned in corpus order, stay what they were.
_TOY_CORPUS = (
    toyvideo.PROMPT_TEMPLATE.format(colour="", shape="", motion="", background=""),
    " ".join(toyvideo.COLOURS),
    " ".join(toyvideo.SHAPES),
    " ".join(toyvideo.MOTIONS),
    " ".join(toyvideo.BACKGROUNDS),
)


def _tiny_transformer_config(num_layers: int) -> dict:
    # attention_head_dim 12: diffusers' RoPE gives 2*(12//6)=4 dims each to h and w and 4 to t, all even.
    return dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=TEXT_DIM,
        freq_dim=32,
        ffn_dim=64,
        num_layers=num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=1024,
    )


_VAE_CONFIG = dict(
    base_dim=8,
    z_dim=16,
    dim_mult=[1, 2, 2, 2],
    num_res_blocks=1,
    attn_scales=[],
    temperal_downsample=[False, True, True],
)

_TEXT_ENCODER_CONFIG = dict(
    vocab_size=256,
    d_model=TEXT_DIM,
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    dropout_rate=0.0,
    feed_forward_proj="gated-gelu",
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)

_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    prediction_type="flow_prediction",
    use_flow_sigmas=True,
    flow_shift=3.0,
)


def _seeded(seed: int, build):
    """Build a module with a private RNG state so the global one is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _build_tokenizer():
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(_SPECIAL_TOKENS)}
    words = pre_tokenizers.Whitespace()
    for sentence in _CORPUS + _TOY_CORPUS:
        for word, _ in words.pre_tokenize_str(sentence.lower()):
            vocab.setdefault(word, len(vocab))
    assert len(vocab) <= _TEXT_ENCODER_CONFIG["vocab_size"]

    tokenizer = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    # T5 tokenizers end every sequence with </s>.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=TEXT_TOKENS,
        padding_side="right",
    )


def build_tokenizer():
    """The tiny word-level tokenizer (UMT5's special ids, every corpus word including the toy vocabulary)."""
    return _build_tokenizer()


def build_text_encoder(seed: int):
    """The tiny random UMT5 encoder that `write_tiny_wan(seed=s)` writes with seed `s + 3`."""
    from transformers import UMT5Config, UMT5EncoderModel

    return _seeded(seed, lambda: UMT5EncoderModel(UMT5Config(**_TEXT_ENCODER_CONFIG)))


def build_scheduler():
    """Wan's UniPC flow-matching scheduler (flow_shift 3), as every tiny checkpoint ships it."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(**_SCHEDULER_CONFIG)


def save_pipeline(
    path,
    *,
    transformer,
    vae,
    text_encoder,
    tokenizer,
    scheduler,
    transformer_2=None,
    boundary_ratio: float | None = None,
    max_shard_size: str | int = TRANSFORMER_SHARD_SIZE,
) -> pathlib.Path:
    """Write a diffusers WanPipeline folder: the transformer(s) sharded at `max_shard_size` (with an index),
    `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/` and `model_index.json`. Old transformer folders
    are replaced, so no stale shard survives."""
    from diffusers import WanPipeline

    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # The pipeline object only serves to write model_index.json with the class names diffusers expects.
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=scheduler,
        transformer=transformer,
        transformer_2=transformer_2,
        boundary_ratio=boundary_ratio,
    )
    for name in ("transformer", "transformer_2"):
        target = path / name
        if target.exists():
            shutil.rmtree(target)
    transformer.save_pretrained(path / "transformer", max_shard_size=max_shard_size)
    if transformer_2 is not None:
        transformer_2.save_pretrained(path / "transformer_2", max_shard_size=max_shard_size)
    vae.save_pretrained(path / "vae")
    text_encoder.save_pretrained(path / "text_encoder")
    tokenizer.save_pretrained(path / "tokenizer")
    scheduler.save_pretrained(path / "scheduler")
    pipe.save_config(path)
    return path


def write_tiny_wan(path, *, seed: int = 0, two_experts: bool = False, num_layers: int = 3) -> pathlib.Path:
    """Write a tiny random fp32 WanPipeline to `path`; the same arguments give byte-identical weights.

    `two_experts` adds a differently-seeded `transformer_2` and a `boundary_ratio`, like Wan2.2-T2V-A14B.
    """
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")

    config = _tiny_transformer_config(num_layers)
    transformer = _seeded(seed, lambda: WanTransformer3DModel(**config))
    transformer_2 = _seeded(seed + 1, lambda: WanTransformer3DModel(**config)) if two_experts else None
    vae = _seeded(seed + 2, lambda: AutoencoderKLWan(**_VAE_CONFIG))
    text_encoder = build_text_encoder(seed + 3)
    path = save_pipeline(
        path,
        transformer=transformer,
        transformer_2=transformer_2,
        boundary_ratio=WAN22_BOUNDARY_RATIO if two_experts else None,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_tokenizer(),
        scheduler=build_scheduler(),
    )
    logger.info(
        "wrote tiny Wan (%d layers, two_experts=%s, seed=%d) to %s", num_layers, two_experts, seed, path
    )
    return path


def main(argv=None) -> int:
    """CLI: write a tiny Wan checkpoint to OUT_DIR."""
    parser = argparse.ArgumentParser(prog="python -m ds_dualparal.toy.tiny", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=pathlib.Path)
    parser.add_argument(
        "--two-experts", action="store_true", help="add transformer_2 and boundary_ratio (Wan2.2 style)"
    )
    parser.add_argument("--layers", type=int, default=3, help="transformer blocks per expert (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.layers < 1:
        parser.error(f"--layers must be >= 1, got {args.layers}")
    out = write_tiny_wan(args.out_dir, seed=args.seed, two_experts=args.two_experts, num_layers=args.layers)
    stdout_report("ds_dualparal.toy.tiny.report").info("%s", out)  # the folder written, for scripts
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
