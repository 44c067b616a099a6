"""Shows on a GPU that the first stage's scheduler steps never wait for it.

    python launch/check_syncs.py [--steps 50] [--frames 48] [--block-size 8] [--context 8]

Applies every block-step's scheduler update of a generation the way the first stage does
(`BlockLatents.step`, bf16 predictions into fp32 latents, anchor-like shapes) on CUDA under
`torch.cuda.set_sync_debug_mode("error")`, for UniPC and Euler, so that any synchronising operation
raises; then counts, for comparison, the synchronisations of diffusers' own UniPC step on the same
inputs. Exits 0 when the engine's steps make none, 1 otherwise; without CUDA it says so and exits 0.
The schedulers are the embedded tiny model's, whose scheduler_config.json is Wan's.
"""

from __future__ import annotations

import argparse
import sys
import warnings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--frames", type=int, default=48, help="latent frames")
    parser.add_argument("--block-size", type=int, default=8)
    parser.add_argument("--context", type=int, default=8)
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("check_syncs: needs a CUDA device; nothing checked")
        return 0
    from ds_dualparal.pipeline.denoise import BlockLatents, GenerationPlan, make_scheduler
    from ds_dualparal.pipeline.timeline import BlockTimeline
    from ds_dualparal.wan.weights import TINY_WAN_PATH

    device = torch.device("cuda")
    timeline = BlockTimeline(args.frames, args.block_size, args.context, args.steps)
    failed = False
    for kind in ("unipc", "euler"):
        scheduler = make_scheduler(kind, 3.0, args.steps, TINY_WAN_PATH / "scheduler")
        plan = GenerationPlan(timeline, scheduler.timesteps.clone(), 60, 104, (1, 2, 2), (5.0,))
        noise = [torch.randn(1, 16, timeline.block_len(b), 60, 104) for b in range(timeline.num_blocks)]
        latents = BlockLatents(plan, noise, scheduler, device)
        predictions = {b: torch.randn(1, 16, timeline.block_len(b), 60, 104, device=device, dtype=torch.bfloat16)
                       for b in range(timeline.num_blocks)}
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for step in timeline.block_steps():
                latents.step(step.block, step.step, predictions[step.block])
        except RuntimeError as err:
            print(f"check_syncs: {kind}: a scheduler step synchronised: {str(err).splitlines()[0]}")
            failed = True
        else:
            print(f"check_syncs: {kind}: {timeline.num_blocks * args.steps} block-step updates, no synchronisation")
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    print(f"check_syncs: diffusers' UniPC step: {diffusers_syncs(args.steps, device)} synchronisations in "
          f"{args.steps} steps of one block")
    return 1 if failed else 0


def diffusers_syncs(steps: int, device) -> int:
    """The synchronisations diffusers' `UniPCMultistepScheduler.step` makes over `steps` steps of one block."""
    import torch

    from ds_dualparal.pipeline.denoise import make_scheduler
    from ds_dualparal.wan.weights import TINY_WAN_PATH

    scheduler = make_scheduler("unipc", 3.0, steps, TINY_WAN_PATH / "scheduler")
    sample = torch.randn(1, 16, 8, 60, 104, device=device)
    output = torch.randn_like(sample, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for t in scheduler.timesteps:
                sample = scheduler.step(output, t, sample, return_dict=False)[0]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


if __name__ == "__main__":
    sys.exit(main())
