"""Run as two ranks by tests/test_stage_variants.py (forked, `conftest.run_forked`), or by hand under the
launcher: the engine paths only GPU benchmarks used to reach, on CPU ranks, in one distributed start-up.

    python -m deepspeed.launcher.runner --num_gpus 2 tests/stage_variants.py CONFIG MODEL OUT

Loads MODEL (two experts) with a lighter first stage (`first_stage_vae_layers` 1.5), generates
CONFIG's video with overlap and in lockstep, and on rank 0 saves both latents, the experts the
steps used and each expert's stage bounds to OUT (safetensors).
"""

import sys

import torch
from safetensors.torch import save_file

from ds_dualparal.config import load_config
from ds_dualparal.pipeline import comm
from ds_dualparal.pipeline.generation import Generator


def main(config: str, model: str, out: str) -> None:
    cfg = load_config(config, {"model": model, "first_stage_vae_layers": 1.5}).dualparal
    generator = Generator(cfg, comm.init_process(cfg.comm_timeout_s))
    [text] = generator.encode([cfg])
    latents = {}
    for name, overlap in (("overlap", True), ("lockstep", False)):
        request = generator.request(cfg, text, overlap=overlap)
        latents[name] = generator.generate(request).latents
    if generator.is_first:
        plan = request.plan
        latents["experts"] = torch.tensor([plan.expert(s) for s in range(plan.timeline.num_steps)])
        latents["bounds"] = torch.tensor([module.parts for module in generator.engine.modules])
        save_file(latents, out)
    comm.shutdown()


if __name__ == "__main__":
    main(*sys.argv[-3:])  # after the launcher's --local_rank
