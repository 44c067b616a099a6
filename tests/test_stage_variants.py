"""Lockstep, two experts and a lighter first stage on two CPU stages, bit for bit against the
single-process reference (one two-rank run of tests/stage_variants.py serves all three)."""

import pytest
import torch
from conftest import ROOT, TINY_CONFIG, run_forked
from safetensors.torch import load_file

from ds_dualparal.config import load_config
from ds_dualparal.pipeline.generation import reference_latents
from ds_dualparal.toy.tiny import write_tiny_wan


@pytest.fixture(scope="module")
def two_stages(tmp_path_factory):
    """(saved latents, experts and bounds, the launch's log, the reference latents) of the two-expert tiny model."""
    cwd = tmp_path_factory.mktemp("stage_variants")
    model = write_tiny_wan(cwd / "two-experts", two_experts=True, num_layers=4)
    result = run_forked(ROOT / "tests" / "stage_variants.py", 2, [TINY_CONFIG, model, "out.safetensors"], cwd, timeout=600)
    assert result.returncode == 0, result.explain()
    want = reference_latents(load_config(TINY_CONFIG, {"model": str(model)}).dualparal)
    return load_file(cwd / "out.safetensors"), result.stdout + result.stderr, want


def test_two_experts_on_two_stages_equal_one_process(two_stages):
    saved, _, want = two_stages
    assert set(saved["experts"].tolist()) == {0, 1}  # the steps cross the boundary: both experts ran
    assert torch.equal(saved["overlap"], want)


def test_lockstep_equals_overlap_bit_for_bit(two_stages):
    saved, _, want = two_stages
    assert torch.equal(saved["lockstep"], saved["overlap"])
    assert torch.equal(saved["lockstep"], want)


def test_a_lighter_first_stage_holds_fewer_blocks_and_changes_nothing(two_stages):
    saved, _, want = two_stages
    # layers: embedding, 4 blocks, head; an even split is 0-2 | 3-5, 1.5 blocks' worth less moves one block
    assert saved["bounds"].tolist() == [[0, 2, 6], [0, 2, 6]]  # both experts
    assert torch.equal(saved["overlap"], want)
