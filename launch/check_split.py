"""Is a CFG pair's block-step bit-identical when its two halves run as separate batches of one?

    python launch/check_split.py [--debug]

Runs a few Wan2.1-1.3B-shaped blocks (random weights, anchor window) on the batch of 2 and on each
half alone, plain and compiled (fused q/k/v + torch.compile), and prints whether the halves match the
pair bit for bit. Splitting the pair into two micro-batches changes the schedule only if they do.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from ds_dualparal.wan.model import (  # noqa: E402
    Conditioner,
    FeatureCache,
    WanBlockLayer,
    WanConfig,
    WindowState,
)
from ds_dualparal.wan.weights import RandomWeights  # noqa: E402


def run(layers, conditioner, wan, frames, cached_frames, h, w, device, rows, dtype):
    torch.manual_seed(0)
    hw = h * w
    text = torch.randn(2, 512, wan.text_dim, device=device, dtype=dtype)
    temb, proj, text = conditioner.embed(torch.tensor([900.0, 900.0], device=device), text)
    cos, sin = conditioner.rotary(frames + cached_frames, h, w, device)
    hidden = torch.randn(2, frames * hw, wan.inner_dim, device=device, dtype=dtype)
    cached = [torch.randn(2, cached_frames * hw, wan.inner_dim, device=device, dtype=dtype) for _ in layers]
    cache = FeatureCache()
    for layer, value in zip(layers, cached):
        cache.put(layer.index, 1, value[rows])
    state = WindowState(block=0, grid=(frames, h, w), own_frames=8, guidance=None, temb=temb[rows],
                        timestep_proj=proj[rows], text=text[rows], rope=(cos.float(), sin.float()), cache=cache,
                        read_cache=True, capture=(cached_frames * hw, 2 * cached_frames * hw), hidden=hidden[rows])
    for layer in layers:
        state = layer(state)
    captured = torch.stack([cache.pop(layer.index, 0) for layer in layers])
    return state.hidden, captured


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--debug", action="store_true", help="CPU, tiny shapes, fp32")
    args = parser.parse_args()
    if args.debug:
        device, dtype, grid = torch.device("cpu"), torch.float32, (4, 4)
        wan = WanConfig(num_layers=args.layers, num_attention_heads=2, attention_head_dim=12, ffn_dim=64, text_dim=32,
                        freq_dim=32)
    else:
        device, dtype, grid = torch.device("cuda"), torch.bfloat16, (30, 52)
        wan = WanConfig(num_layers=30, num_attention_heads=12, attention_head_dim=128, ffn_dim=8960)
    weights = RandomWeights(0, dtype, device)
    conditioner = Conditioner(wan, weights).to(device)
    torch._dynamo.config.recompile_limit = 64
    with torch.no_grad():
        for compiled in (False, True):
            layers = [WanBlockLayer(wan, i, weights, None, compiled) for i in range(args.layers)]
            pair = run(layers, conditioner, wan, 16, 8, *grid, device, slice(0, 2), dtype)
            halves = [run(layers, conditioner, wan, 16, 8, *grid, device, slice(k, k + 1), dtype) for k in (0, 1)]
            for name, i in (("hidden", 0), ("captured", 1)):
                joined = torch.cat([h[i] for h in halves], dim=1 if name == "captured" else 0)
                same = torch.equal(pair[i], joined)
                diff = (pair[i].float() - joined.float()).abs().max().item()
                print(f"{'compiled' if compiled else 'plain'} {name}: bit-identical {same} (max abs diff {diff:.3g})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
