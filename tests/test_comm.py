"""Process start is explicit, and the DeepSpeed internals `pipeline/comm.py` relies on are pinned."""

import re
from pathlib import Path

import deepspeed
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


def test_deepspeed_names_its_shared_buffers_as_comm_unlinks_them():
    """comm.init_process unlinks DeepSpeed's /dev/shm all-reduce buffers by name (there is no API);
    if an upgrade renames them, the buffers would silently pile up in RAM-backed /dev/shm."""
    source = (Path(deepspeed.__file__).parent / "ops" / "csrc" / "cpu" / "comm" / "shm.cpp").read_text()
    prefix = re.search(r'#define SHM_BUFFER_NAME "([^"]+)"', source)
    assert prefix and prefix[1] == comm.SHARED_BUFFER_PREFIX
    assert re.search(r'"%s_%d_%s_%s",\s*SHM_BUFFER_NAME,\s*getuid\(\),\s*addr_string,\s*port_string', source)
    assert re.search(r'snprintf\(shm_name, NAME_BUF_SIZE, "%s_%d", shm_name_prefix, rank\)', source)
    name = "%s_%d_%s_%s" % (prefix[1], 1000, "127.0.0.1", "29500") + "_%d" % 3
    assert comm.shared_buffer_name(1000, "127.0.0.1", "29500", 3) == name
