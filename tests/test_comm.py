"""Process start is explicit, and the DeepSpeed internals `pipeline/comm.py` relies on are pinned."""

import pytest
import torch
from conftest import TINY_CONFIG

from ds_dualparal.config import load_config
from ds_dualparal.pipeline import comm
from ds_dualparal.pipeline.generation import Generator


def test_a_generator_does_not_start_the_process_group():
    assert not comm.is_started()
    with pytest.raises(RuntimeError, match="call pipeline.comm.init_process first"):
        Generator(load_config(TINY_CONFIG).dualparal, torch.device("cpu"))
    assert not comm.is_started()
