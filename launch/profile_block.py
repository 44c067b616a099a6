"""Where one block-step's time goes, on one GPU: plain vs compiled path (fused q/k/v + torch.compile, with the
self-attention between two compiled graphs or, ``one_graph``, inside one as an opaque operator), a
kernel-time breakdown (attention / matmul / other), and VAE decode variants of one block.

    python3 launch/profile_block.py --out profile.json
    python3 launch/profile_block.py --vae-only --out decode.json

Full-size Wan2.1-1.3B shapes with random weights; the window is the anchor config's (16 latent frames
of 480x832 plus 8 cached frames, CFG batch of 2). Prints a short table; writes every number to --out.

The VAE part decodes as the command does (Wan2.1's VAE, random weights of seed 0, streamed by
``output.video.StreamingDecoder``): block 0 (8 latent frames of 60x104), then the timed second 8-frame
block, in float32 and bfloat16 for each variant: ``eager`` (diffusers' module as is), ``channels_last``
(the module's conv weights and the latents in channels-last memory format: ``StreamingDecoder(vae,
channels_last=True)``, the engine's default on CUDA), ``compiled`` (the decoder
under ``torch.compile(dynamic=False)``; its first call, the compile, is reported apart) and
``channels_last_benchmark`` (channels-last with ``torch.backends.cudnn.benchmark``: cuDNN times its
convolution algorithms on each new shape, in the first call, and keeps the fastest). Per variant: median
seconds per 8-latent-frame block, first-call seconds (blocks 0 and 1, cold), peak extra GiB, the share of
conv inputs in channels-last format, and its frames against eager float32 (relative L2, max abs, and
uint8 mean / max abs levels). ``--vae-only`` skips the transformer and runs only this part;
``--vae-variants`` picks variants (eager always runs: it is the reference). With ``--debug`` the VAE part
runs only with ``--vae-only``, on a tiny VAE and 4x4 latent pixels on the CPU (timings meaningless; the
compiles take minutes there: ``--vae-variants eager,channels_last`` leaves them out).
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
from ds_dualparal.files import atomic_output  # noqa: E402
from ds_dualparal.output.video import StreamingDecoder, to_uint8_frames  # noqa: E402
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


# name: (StreamingDecoder's channels_last, compile the decoder, cuDNN's benchmark mode). Eager is the reference.
# channels_last is passed either way: its default (None) would turn it on for every variant on CUDA. The
# benchmark mode times cuDNN's convolution algorithms on each new shape and keeps the fastest.
VAE_VARIANTS = {
    "eager": (False, False, False),
    "channels_last": (True, False, False),
    "compiled": (False, True, False),
    "channels_last_compiled": (True, True, False),
    "channels_last_benchmark": (True, False, True),
}
DEFAULT_VAE_VARIANTS = "eager,channels_last,compiled"
TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1)


def conv_inputs_channels_last(decoder: StreamingDecoder, latents) -> str:
    """Decodes one latent frame (then resets); counts the decoder's conv inputs (before the causal padding)
    that are strictly channels-last. The conv kernel decides its output's format (CPU fp32 Conv3d returns
    contiguous outputs, cuDNN keeps channels-last), so this says whether the variant keeps its layout."""
    seen = []

    def hook(module, args):
        x = args[0]
        fmt = torch.channels_last_3d if x.dim() == 5 else torch.channels_last
        seen.append(x.is_contiguous(memory_format=fmt) and not x.is_contiguous())

    convs = [m for m in decoder.vae.decoder.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
    handles = [m.register_forward_pre_hook(hook) for m in convs]
    try:
        decoder.decode(latents[:, :, :1])
    finally:
        for handle in handles:
            handle.remove()
        decoder.reset()
    return f"{sum(seen)}/{len(seen)}"


def compare(ref: torch.Tensor, video: torch.Tensor) -> dict:
    """Frames in [-1, 1] (fp32, CPU) against the reference: relative L2, max abs, uint8 mean / max abs levels."""
    diff = abs(to_uint8_frames(ref).astype(int) - to_uint8_frames(video).astype(int))
    return dict(rel_l2=float((video - ref).norm() / ref.norm()), max_abs=float((video - ref).abs().max()),
                uint8_mean_abs=float(diff.mean()), uint8_max_abs=int(diff.max()))


def decode_variant(vae, latents, channels_last: bool, compile: bool, repeats: int,
                   device) -> tuple[dict, torch.Tensor]:
    """Times the second 8-frame block (after block 0) through a StreamingDecoder; returns numbers and the frames.

    With ``channels_last`` the decoder converts the VAE's conv weights (here, before the timings) and
    each block's latents (inside them, as in the engine)."""
    decoder = StreamingDecoder(vae, channels_last=channels_last)
    layout = conv_inputs_channels_last(decoder, latents)  # eagerly: hooks in a compiled graph would recompile
    torch._dynamo.utils.counters.clear()
    if compile:
        vae.decoder.compile(dynamic=False)
    first_block, second_block = latents[:, :, :8], latents[:, :, 8:]
    started = time.perf_counter()  # cold: blocks 0 and 1 (all the compiles of a compiled decoder)
    decoder.decode(first_block)
    decoder.decode(second_block)
    _sync()
    first_call = time.perf_counter() - started
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(repeats):
        decoder.reset()
        decoder.decode(first_block)
        times += timed(lambda: decoder.decode(second_block), 1)
    decoder.reset()
    video = torch.cat([decoder.decode(first_block).float().cpu(), decoder.decode(second_block).float().cpu()], dim=2)
    peak = (torch.cuda.max_memory_allocated(device) - before) / 2**30 if cuda else None
    numbers = dict(seconds_per_8_frame_block=statistics.median(times), times=times, first_call_s=first_call,
                   peak_extra_gib=peak, conv_inputs_channels_last=layout)
    if compile:
        numbers["graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        numbers["graph_breaks"] = sum(torch._dynamo.utils.counters["graph_break"].values())
    return numbers, video


def vae_numbers(device, repeats: int, variants=DEFAULT_VAE_VARIANTS.split(","), tiny: bool = False,
                on_variant=lambda out: None) -> dict:
    """Every variant in float32 and bfloat16; ``out[variant][dtype]``, and the eager pair also as before:
    ``out["float32"]``, ``out["bfloat16"]``, ``out["bf16_vs_fp32"]``. ``on_variant(out)`` after each one, so a
    run cut short by a time limit keeps what it measured."""
    from diffusers import AutoencoderKLWan

    config = TINY_VAE if tiny else {}
    torch.manual_seed(0)
    state = AutoencoderKLWan(**config).state_dict()  # the same random weights for every variant
    latent_hw = (4, 4) if tiny else (60, 104)
    latents = torch.randn(1, 16, 16, *latent_hw, device=device)  # block 0 (8 frames) then an 8-frame block
    torch._dynamo.config.recompile_limit = 64  # per decoder: first chunk, the caches filling up, each dtype
    out = {"variants": [name for name in VAE_VARIANTS if name == "eager" or name in variants]}
    ref = None
    for name in out["variants"]:
        channels_last, compiled, benchmark = VAE_VARIANTS[name]
        out[name] = {}
        for dtype in (torch.float32, torch.bfloat16):
            dtype_name = str(dtype).removeprefix("torch.")
            vae = AutoencoderKLWan(**config)
            vae.load_state_dict(state)
            vae = vae.to(device, dtype).eval()
            torch.backends.cudnn.benchmark = benchmark
            try:
                numbers, video = decode_variant(vae, latents, channels_last, compiled, repeats, device)
            finally:
                torch.backends.cudnn.benchmark = False
            if ref is None:  # eager float32 runs first
                ref = video
            numbers["vs_eager_float32"] = compare(ref, video)
            out[name][dtype_name] = numbers
            print(vae_line(name, dtype_name, numbers), flush=True)
            on_variant(out)
            del vae, video
            if compiled:
                torch._dynamo.reset()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    # the keys from before the variants (docs and tools read them)
    out["float32"], out["bfloat16"] = out["eager"]["float32"], out["eager"]["bfloat16"]
    out["bf16_vs_fp32"] = out["bfloat16"]["vs_eager_float32"]
    return out


def vae_line(name: str, dtype: str, v: dict) -> str:
    peak = "" if v["peak_extra_gib"] is None else f", +{v['peak_extra_gib']:.2f} GiB"
    d = v["vs_eager_float32"]
    compiled = f", {v['graphs']} graphs, {v['graph_breaks']} graph breaks" if "graphs" in v else ""
    return (f"VAE {name:>22} {dtype:>8}: {v['seconds_per_8_frame_block']:.3f} s per 8-latent-frame block "
            f"(first call {v['first_call_s']:.1f} s{peak}; conv inputs channels-last {v['conv_inputs_channels_last']}"
            f"{compiled}); vs eager fp32: uint8 mean {d['uint8_mean_abs']:.3f} max {d['uint8_max_abs']}, "
            f"rel L2 {d['rel_l2']:.2e}")


# name: (compile, self-attention inside the compiled graph as an opaque operator)
BLOCK_VARIANTS = {"plain": (False, False), "compiled": (True, False), "one_graph": (True, True)}


def transformer_numbers(args, device) -> dict:
    """Plain vs compiled block-step (attention between two graphs, or inside one); prints its lines."""
    if args.debug:
        wan, grid = WanConfig(num_layers=2, num_attention_heads=2, attention_head_dim=8, ffn_dim=32, text_dim=32,
                              freq_dim=32), (2, 2)
        args.layers = 2
    else:
        wan, grid = WanConfig(**SHAPE), (30, 52)
    weights = RandomWeights(0, torch.bfloat16, device)
    conditioner = Conditioner(wan, weights).to(device)
    results = {}
    for name, (compiled, in_graph) in BLOCK_VARIANTS.items():
        torch._dynamo.config.recompile_limit = 64
        torch._dynamo.utils.counters.clear()
        layers = [WanBlockLayer(wan, i, weights, None, compiled, in_graph) for i in range(args.layers)]
        run = block_step(layers, conditioner, wan, 16, 8, *grid, device)
        started = time.perf_counter()
        reference = run()
        first = time.perf_counter() - started
        times = timed(run, args.repeats)
        results[name] = dict(
            first_call_s=first, seconds=statistics.median(times), times=times,
            graphs=torch._dynamo.utils.counters["stats"]["unique_graphs"],
            kernels=breakdown(run) if device.type == "cuda" else {},
            output=reference.float().cpu())
        del layers
        torch.cuda.empty_cache()
    plain = results["plain"].pop("output")
    for name in BLOCK_VARIANTS:
        if name != "plain":
            other = results[name].pop("output")
            results[f"{name}_vs_plain_rel_l2"] = float((other - plain).norm() / plain.norm())
    for name in BLOCK_VARIANTS:
        r = results[name]
        kernels = ", ".join(f"{k} {v:.3f}" for k, v in sorted(r["kernels"].items()))
        versus = f"; vs plain rel L2 {results[name + '_vs_plain_rel_l2']:.2e}" if name != "plain" else ""
        print(f"{name:>9}: {r['seconds']:.3f} s per block-step ({args.layers} layers; first call {r['first_call_s']:.1f} s, "
              f"{r['graphs']} graphs{versus}); kernels: {kernels}", flush=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="profile.json")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5, help="timed block-steps")
    parser.add_argument("--vae-only", action="store_true", help="skip the transformer; only the VAE decode variants")
    parser.add_argument("--vae-variants", default=DEFAULT_VAE_VARIANTS,
                        help=f"comma-separated, of {', '.join(VAE_VARIANTS)} (eager always runs)")
    parser.add_argument("--vae-repeats", type=int, default=3, help="timed 8-latent-frame blocks per variant")
    parser.add_argument("--debug", action="store_true", help="CPU smoke test of this script on a tiny shape "
                        "(the VAE part only with --vae-only)")
    args = parser.parse_args()
    variants = args.vae_variants.split(",")
    unknown = set(variants) - set(VAE_VARIANTS)
    if unknown:
        parser.error(f"unknown --vae-variants {sorted(unknown)}; known: {', '.join(VAE_VARIANTS)}")
    device = torch.device("cpu" if args.debug else "cuda")
    results = {}

    def save(vae=None):  # whole files only: written beside --out, then renamed
        if vae is not None:
            results["vae"] = vae
        with atomic_output(args.out, overwrite=True) as path:
            path.write_text(json.dumps(results, indent=1))

    with torch.no_grad():
        if not args.vae_only:
            results.update(transformer_numbers(args, device))
            save()
        if device.type == "cuda" or args.vae_only:
            save(vae_numbers(device, args.vae_repeats, variants, tiny=args.debug, on_variant=save))
    save()
    print("VAE bf16 vs fp32:", results.get("vae", {}).get("bf16_vs_fp32"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
