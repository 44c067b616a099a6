"""Which layers each pipeline stage holds: DeepSpeed's partition functions over the model's layer list.

Computed here from the `LayerSpec`s' class names, before any `PipelineModule` is built, so that the
first stage can be given less work than its share (`first_stage_vae_layers`). The split is DeepSpeed's: `partition_uniform` for 'uniform', `partition_balanced` over a weight of 1 per
layer whose class name the regex of 'type:<regex>' finds (case-insensitive), as its `PipelineModule`
does; the first stage may carry extra weight for the decoding it does beside its layers.
"""

from __future__ import annotations

import re

from deepspeed.runtime.utils import partition_balanced, partition_uniform


def layer_weights(names: list[str], method: str) -> list[float]:
    """Per layer, the weight a 'type:<regex>' partition gives it (1 where the regex finds its class name)."""
    if not method.lower().startswith("type:"):
        raise ValueError(f"partition method {method!r} is not 'type:<regex>'")
    pattern = re.compile(method.split(":")[1], re.IGNORECASE)
    return [1.0 if pattern.search(name) else 0.0 for name in names]


def balanced_parts(layer_weights: list[float], stages: int, first_stage_vae_layers: float) -> list[int]:
    """Stage boundaries over the layers (DeepSpeed's balanced partition), the first stage carrying
    `first_stage_vae_layers` more weight (its decoding) than its layers."""
    weights = list(layer_weights)
    weights[0] += first_stage_vae_layers
    return [int(p) for p in partition_balanced(weights=weights, num_parts=stages)]


def stage_bounds(names: list[str], method: str, stages: int, first_stage_vae_layers: float = 0.0) -> list[int]:
    """`stages + 1` boundaries: stage s holds layers `bounds[s]` to `bounds[s + 1] - 1`."""
    if method.lower() == "uniform":
        return [int(p) for p in partition_uniform(num_items=len(names), num_parts=stages)]
    weights = layer_weights(names, method)
    if not any(weights):
        raise ValueError(f"partition method {method!r} matches none of the layers ({', '.join(sorted(set(names)))})")
    return balanced_parts(weights, stages, first_stage_vae_layers)
