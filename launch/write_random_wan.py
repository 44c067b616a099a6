"""Write a diffusers Wan text-to-video folder with seeded random weights of a real shape (no download), so
the real command (`launch/generate.py --model FOLDER`) can be timed end to end on a machine that cannot
reach the hub: start-up, checks, loading, text encoding, generation, decoding and writing.

    python launch/write_random_wan.py --shape 1.3b --out /tmp/wan-1.3b-random --device cuda

The shapes are `launch/bench.py`'s: the transformer in bf16 (as `from_pretrained(torch_dtype=bfloat16)`
leaves it), Wan2.1's VAE (diffusers' defaults) in fp32, a UMT5-XXL-sized text encoder in bf16 (the debug
shapes take tiny ones), the embedded tiny model's tokenizer and Wan's UniPC scheduler (flow shift 3).
The pictures are noise; the times and memory are the real model's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

from bench import SHAPES, as_loaded, random_vae  # noqa: E402  (after the paths: launch/ and the checkout)


def text_encoder_config(shape: str):
    from transformers import UMT5Config

    if shape.startswith("debug"):
        return UMT5Config(vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
    return UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                      feed_forward_proj="gated-gelu")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python launch/write_random_wan.py", description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=[s for s in SHAPES if "i2v" not in s], default="1.3b")
    parser.add_argument("--out", type=Path, required=True, help="the folder to write (must not exist)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the random weights are drawn (faster on the GPU)")
    args = parser.parse_args(argv)
    if args.out.exists():
        parser.error(f"--out {args.out} exists; give a new folder")

    from diffusers import WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    from ds_dualparal.toy.tiny import build_scheduler, save_pipeline
    from ds_dualparal.wan.weights import TINY_WAN_PATH

    started = time.perf_counter()
    text_dim = SHAPES[args.shape].get("text_dim", 4096)
    torch.manual_seed(0)
    with torch.device(args.device):
        transformer = as_loaded(WanTransformer3DModel(**{"text_dim": text_dim, **SHAPES[args.shape]}), torch.bfloat16)
        text_encoder = UMT5EncoderModel(text_encoder_config(args.shape)).to(torch.bfloat16).eval()
    vae = random_vae(args.shape, 8, args.device, torch.float32)
    # written beside --out and renamed when whole: an interrupted run leaves no folder that looks like a model
    partial = args.out.parent / f".{args.out.name}.partial-{os.getpid()}"
    try:
        save_pipeline(partial, transformer=transformer.cpu(), vae=vae.cpu(), text_encoder=text_encoder.cpu(),
                      tokenizer=AutoTokenizer.from_pretrained(TINY_WAN_PATH / "tokenizer"),
                      scheduler=build_scheduler(), max_shard_size="5GB")
        partial.rename(args.out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    print(f"wrote random {args.shape} Wan to {args.out} in {time.perf_counter() - started:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
