"""Stage 0 decodes the finished blocks beside its layers: the partition gives it fewer blocks."""

import pytest
from deepspeed.runtime.utils import partition_balanced, partition_uniform

from ds_dualparal.pipeline.partition import balanced_parts, stage_bounds

# embedding, 30 blocks, head: what 'type:WanBlockLayer' weighs
LAYERS = [0.0] + [1.0] * 30 + [0.0]


def test_no_extra_work_is_deepspeeds_own_partition():
    assert balanced_parts(LAYERS, 2, 0.0) == [int(p) for p in partition_balanced(LAYERS, 2)] == [0, 16, 32]


def test_first_stage_vae_layers_move_blocks_to_the_other_stages():
    assert balanced_parts(LAYERS, 2, 2.4) == [0, 15, 32]  # embedding + 14 blocks | 16 blocks + head
    parts = balanced_parts(LAYERS, 4, 3.0)
    blocks = [parts[s + 1] - parts[s] for s in range(4)]
    blocks[0] -= 1  # the embedding
    assert blocks[0] < min(blocks[1:]) and sum(blocks) == 31  # 30 blocks and the head



NAMES = ["WanEmbedLayer"] + ["WanBlockLayer"] * 5 + ["WanHeadLayer"]


def test_stage_bounds_are_deepspeeds_partitions():
    assert stage_bounds(NAMES, "uniform", 3) == [int(p) for p in partition_uniform(len(NAMES), 3)]
    blocks = [0.0] + [1.0] * 5 + [0.0]
    assert stage_bounds(NAMES, "type:WanBlockLayer", 2) == [int(p) for p in partition_balanced(blocks, 2)]
    even = stage_bounds(NAMES, "type:WanBlockLayer", 2)
    assert stage_bounds(NAMES, "type:wanblock", 2) == even  # as DeepSpeed: any case
    assert stage_bounds(NAMES, "type:block|head", 2) == [int(p) for p in partition_balanced(blocks[:-1] + [1.0], 2)]
    assert stage_bounds(NAMES, "type:WanBlockLayer", 2, first_stage_vae_layers=2.0)[1] < even[1]
    with pytest.raises(ValueError, match="matches none of the layers"):
        stage_bounds(NAMES, "type:NoSuchLayer", 2)


def test_pipeline_module_hooks_the_engine_relies_on():
    """`engine.StagePipeline` passes its bounds through PipelineModule's private partition hook: this
    fails on a DeepSpeed whose PipelineModule no longer calls it, or builds layers without `_set_bounds`'s
    range (the 2-rank run in test_stage_variants checks the bounds and the latents end to end)."""
    import inspect

    from deepspeed.pipe import PipelineModule

    init = inspect.getsource(PipelineModule.__init__)
    assert "self.stage_id = self._topo.get_coord(self.global_rank).pipe" in init
    assert init.index("self.stage_id =") < init.index("self._partition_layers(method=partition_method)")
    assert list(inspect.signature(PipelineModule._set_bounds).parameters) == ["self", "start", "stop"]
    build = inspect.getsource(PipelineModule._build)
    assert "specs = self._layer_specs" in build and "specs[self._local_start:self._local_stop]" in build
