"""Where the command's start-up goes, before it reads any flag: the imports, CUDA's start, the process group.

    python3 launch/profile_startup.py
    python3 -X importtime -c "import torch, deepspeed; import diffusers.models.transformers.transformer_wan" 2> imp.log

Each line is the time of one step after the ones above it (an import of what an earlier step already
imported costs nothing), in the order the command meets them. The second command says which modules
inside those imports take the time (sort its lines by the second column).
"""

import time

started = time.perf_counter()
steps = []


def step(name: str) -> None:
    global started
    now = time.perf_counter()
    steps.append((name, now - started))
    started = now


import torch  # noqa: E402

step("torch import")
if torch.cuda.is_available():
    torch.zeros(1, device="cuda")
    step("CUDA start")
import deepspeed  # noqa: E402, F401

step("deepspeed import")
import diffusers.models.transformers.transformer_wan  # noqa: E402, F401

step("diffusers' Wan import")
import ds_dualparal.cli.main  # noqa: E402, F401
import ds_dualparal.pipeline.generation  # noqa: E402, F401

step("ds_dualparal import")
from ds_dualparal.pipeline import comm  # noqa: E402

comm.init_process(60)
step("process group")
print("start-up: " + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in steps)
      + f"; total {sum(s for _, s in steps):.2f} s", flush=True)
comm.shutdown()
