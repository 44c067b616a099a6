"""Stage 0 decodes the finished blocks beside its layers: the partition gives it fewer blocks."""

from deepspeed.runtime.utils import partition_balanced

from ds_dualparal.pipeline.engine import balanced_parts

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

