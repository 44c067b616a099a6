"""Where one block-step's time goes, on one GPU: plain vs compiled path (fused q/k/v + torch.compile), a
kernel-time breakdown (attention / matmul / other), and the VAE decode of one block in fp32 and bf16.

    python launch/profile_block.py --out profile.json

Full-size Wan2.1-1.3B shapes with random weights; the window is the anchor config's (16 latent frames
of 480x832 plus 8 cached frames, CFG batch of 2). Prints a short table; writes every number to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
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

SHAPE = dict(num_layers=30, num_attention_heads=12, attention_head_dim=128, ffn_dim=8960)


def category(name: str) -> str:
    low = name.lower()
    if any(k in low for k in ("flash", "fmha", "cudnn", "attention", "sdpa")):
        return "attention"
    if any(k in low for k in ("gemm", "xmma", "cutlass", "nvjet", "matmul", "sm90")):
        return "matmul"
    if any(k in low for k in ("nccl", "memcpy", "memset")):
        return "copy/comm"
    return "elementwise/other"


def block_step(layers, conditioner, wan, frames, cached_frames, h, w, device):
    """One block-step (window `frames`, reading `cached_frames` of cache and capturing) through `layers`."""
    torch.manual_seed(0)
    hw = h * w
    text = torch.randn(2, 512, wan.text_dim, device=device, dtype=torch.bfloat16)
    temb, proj, text = conditioner.embed(torch.tensor([900.0, 900.0], device=device), text)
    cos, sin = conditioner.rotary(frames + cached_frames, h, w, device)
    rope = (cos.float(), sin.float())
    hidden = torch.randn(2, frames * hw, wan.inner_dim, device=device, dtype=torch.bfloat16)
    cached = [torch.randn(2, cached_frames * hw, wan.inner_dim, device=device, dtype=torch.bfloat16) for _ in layers]

    def run():
        cache = FeatureCache()
        for layer, value in zip(layers, cached):
            cache.put(layer.index, 1, value)
        state = WindowState(block=0, grid=(frames, h, w), own_frames=8, guidance=5.0, temb=temb, timestep_proj=proj,
                            text=text, rope=rope, cache=cache, read_cache=True,
                            capture=(cached_frames * hw, 2 * cached_frames * hw), hidden=hidden)
        for layer in layers:
            state = layer(state)
        return state.hidden

    return run


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return times


def breakdown(fn) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        if event.device_type.name != "CUDA":
            continue
        key = category(event.key)
        totals[key] = totals.get(key, 0.0) + event.self_device_time_total / 1e6
    return totals


def vae_numbers(device, repeats: int) -> dict:
    from diffusers import AutoencoderKLWan

    from ds_dualparal.output.video import StreamingDecoder, to_uint8_frames

    torch.manual_seed(0)
    vae32 = AutoencoderKLWan().to(device).eval()
    vae16 = AutoencoderKLWan().to(device).eval()
    vae16.load_state_dict(vae32.state_dict())
    vae16.to(torch.bfloat16)
    latents = torch.randn(1, 16, 16, 60, 104, device=device)  # block 0 (16 frames) then an 8-frame block
    out = {}
    frames = {}
    for name, vae in (("float32", vae32), ("bfloat16", vae16)):
        decoder = StreamingDecoder(vae)
        decoder.decode(latents[:, :, :8])
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)

        def one_block():
            return decoder.decode(latents[:, :, 8:])

        times = []
        for _ in range(repeats):
            decoder.reset()
            decoder.decode(latents[:, :, :8])
            times += timed(one_block, 1)
        decoder.reset()
        video = torch.cat([decoder.decode(latents[:, :, :8]), decoder.decode(latents[:, :, 8:])], dim=2)
        frames[name] = video.float()
        out[name] = dict(seconds_per_8_frame_block=statistics.median(times), times=times,
                         peak_extra_gib=(torch.cuda.max_memory_allocated(device) - before) / 2**30)
    ref, low = frames["float32"], frames["bfloat16"]
    u_ref, u_low = to_uint8_frames(ref), to_uint8_frames(low)
    diff = abs(u_ref.astype(int) - u_low.astype(int))
    out["bf16_vs_fp32"] = dict(rel_l2=float((low - ref).norm() / ref.norm()), max_abs=float((low - ref).abs().max()),
                               uint8_mean_abs=float(diff.mean()), uint8_max_abs=int(diff.max()))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="profile.json")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--debug", action="store_true", help="CPU smoke test of this script on a tiny shape")
    args = parser.parse_args()
    if args.debug:
        device, wan, grid = torch.device("cpu"), WanConfig(num_layers=2, num_attention_heads=2, attention_head_dim=8,
                                                           ffn_dim=32, text_dim=32, freq_dim=32), (2, 2)
        args.layers = 2
    else:
        device, wan, grid = torch.device("cuda"), WanConfig(**SHAPE), (30, 52)
    weights = RandomWeights(0, torch.bfloat16, device)
    conditioner = Conditioner(wan, weights).to(device)
    results = {}
    with torch.no_grad():
        for compiled in (False, True):
            torch._dynamo.config.recompile_limit = 64
            layers = [WanBlockLayer(wan, i, weights, None, compiled) for i in range(args.layers)]
            run = block_step(layers, conditioner, wan, 16, 8, *grid, device)
            started = time.perf_counter()
            reference = run()
            first = time.perf_counter() - started
            times = timed(run, args.repeats)
            results["compiled" if compiled else "plain"] = dict(
                first_call_s=first, seconds=statistics.median(times), times=times,
                kernels=breakdown(run) if device.type == "cuda" else {},
                output=reference.float().cpu())
            del layers
            torch.cuda.empty_cache()
        plain, compiled = results["plain"].pop("output"), results["compiled"].pop("output")
        results["compiled_vs_plain_rel_l2"] = float((compiled - plain).norm() / plain.norm())
        if device.type == "cuda":
            results["vae"] = vae_numbers(device, 3)
    Path(args.out).write_text(json.dumps(results, indent=1))
    for name in ("plain", "compiled"):
        r = results[name]
        kernels = ", ".join(f"{k} {v:.3f}" for k, v in sorted(r["kernels"].items()))
        print(f"{name:>5}: {r['seconds']:.3f} s per block-step ({args.layers} layers; first call {r['first_call_s']:.1f} s); "
              f"kernels: {kernels}")
    print(f"compiled vs plain: rel L2 {results['compiled_vs_plain_rel_l2']:.2e}")
    for name in ("float32", "bfloat16") if "vae" in results else ():
        v = results["vae"][name]
        print(f"VAE {name}: {v['seconds_per_8_frame_block']:.3f} s per 8-latent-frame block, +{v['peak_extra_gib']:.2f} GiB")
    print("VAE bf16 vs fp32:", results.get("vae", {}).get("bf16_vs_fp32"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
