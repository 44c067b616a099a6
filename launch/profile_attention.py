"""The self-attention alone at the anchor config's window shapes, backend against backend, on one GPU.

    python3 launch/profile_attention.py --out attention.json
    python3 launch/profile_attention.py --backends cudnn,flash_4 --repeats 20

Wan2.1-1.3B's attention (12 heads of 128, bf16) over a CFG batch of 2; the anchor config's windows
(480x832: 1560 tokens a latent frame): 16 frames of queries against 16 + 8 cached frames of keys (every
block but the last) and against 16 (the last block). Backends: PyTorch's SDPA kernels ``cudnn``,
``flash`` (FlashAttention 2 inside PyTorch) and ``efficient``, and ``flash_4`` (FlashAttention 4, the
``flash-attn-4`` package, as the engine's ``attention_backend: flash_4`` calls it; skipped with a note
when it is not installed). Per backend and shape: the first call's seconds (FlashAttention 4 compiles
its kernel then), the median of ``--repeats`` timed calls, TFLOP/s (4 * batch * heads * queries * keys *
head_dim per call), and the output against cuDNN's (max abs, relative L2). ``--debug`` runs a tiny
shape on the CPU with PyTorch's math kernel and flash_4, which cannot run there (timings meaningless): a
smoke test of this script.
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
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from ds_dualparal.files import atomic_output  # noqa: E402

SDPA = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def attention_fn(name: str):
    """(batch, tokens, heads, head_dim) in and out, as the engine's attention is called."""
    if name == "flash_4":
        from ds_dualparal.wan.model import flash_4_attention

        return flash_4_attention
    backend = SDPA[name]

    def sdpa(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
                                                  ).transpose(1, 2)
    return sdpa


def timed(fn, repeats: int, device: torch.device) -> tuple[float, list[float]]:
    """First call's seconds, then `repeats` timed calls' seconds."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    sync()
    start = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1000)
        else:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return first, times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="attention.json")
    parser.add_argument("--backends", default="cudnn,flash,efficient,flash_4")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--debug", action="store_true", help="tiny shape on the CPU, math kernel only")
    args = parser.parse_args(argv)
    if args.debug:
        device, tokens, heads, head_dim, backends = torch.device("cpu"), 6, 2, 16, ["math", "flash_4"]
        dtype = torch.float32  # flash_4 cannot run on a CPU: its rows say why
    else:
        device, tokens, heads, head_dim = torch.device("cuda"), 1560, 12, 128
        backends, dtype = args.backends.split(","), torch.bfloat16
    reference = backends[0]
    shapes = {"16+8 cached frames": (16, 24), "16 frames (last block)": (16, 16)}
    rows = []
    for label, (q_frames, k_frames) in shapes.items():
        gen = torch.Generator(device).manual_seed(0)
        q = torch.randn(2, q_frames * tokens, heads, head_dim, device=device, dtype=dtype, generator=gen)
        k = torch.randn(2, k_frames * tokens, heads, head_dim, device=device, dtype=dtype, generator=gen)
        v = torch.randn(2, k_frames * tokens, heads, head_dim, device=device, dtype=dtype, generator=gen)
        flops = 4 * 2 * heads * q.shape[1] * k.shape[1] * head_dim
        want = None
        for name in backends:
            row = {"shape": label, "queries": q.shape[1], "keys": k.shape[1], "backend": name}
            try:
                fn = attention_fn(name)
                first, times = timed(lambda: fn(q, k, v), args.repeats, device)
                out = fn(q, k, v).float()
            except Exception as err:  # noqa: BLE001 - a backend this machine lacks is a row, not a failure
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                rows.append(row)
                print(f"{label:24s} {name:10s} not run: {row['error']}", flush=True)
                continue
            seconds = statistics.median(times)
            row.update(first_s=first, ms=seconds * 1000, tflops=flops / seconds / 1e12)  # unrounded: the print rounds
            if name == reference:
                want = out
            elif want is not None:
                row["max_abs_vs_" + reference] = float((out - want).abs().max())
                row["rel_l2_vs_" + reference] = float((out - want).norm() / want.norm())
            rows.append(row)
            extra = "".join(f" {key} {value:.2e}" for key, value in row.items() if key.endswith("vs_" + reference))
            print(f"{label:24s} {name:10s} {row['ms']:9.3f} ms {row['tflops']:7.1f} TFLOP/s "
                  f"first {row['first_s']:.2f} s{extra}", flush=True)
    with atomic_output(Path(args.out), overwrite=True) as tmp:
        Path(tmp).write_text(json.dumps({"device": torch.cuda.get_device_name(device) if device.type == "cuda"
                                         else "cpu", "torch": torch.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
