"""The pipelined engine under DeepSpeed's launcher on CPU ranks (gloo) against the sequential reference.

Bit-identical latents are the contract: every block-step computes the same values whatever the
partition, so 1, 2 or 3 stages must match the reference exactly (2 replicas x 2 stages: test_prompts.py).
"""

import json
import re

import pytest
import torch
from conftest import TINY_CONFIG, run_deepspeed
from safetensors.torch import load_file

from ds_dualparal.config import load_config
from ds_dualparal.pipeline.generation import reference_latents
from ds_dualparal.wan.weights import TINY_WAN_PATH, SafetensorsFolder


def launch(ranks: int, workdir, *args: str):
    result = run_deepspeed(ranks, *args, cwd=workdir, timeout=600)
    assert result.returncode == 0, result.explain()
    # no CPU world builds or loads DeepSpeed's shared-memory all-reduce op (pipeline/comm.py says why)
    assert "built successfully" not in result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def tiny_reference():
    cfg = load_config(TINY_CONFIG).dualparal
    assert cfg.latent_frames == 6 and cfg.block_size == 2 and cfg.context == 1  # K = 2, ragged block 0 of 4
    return reference_latents(cfg)


def _tensors_read(log: str) -> list[int]:
    return [int(n) for n in re.findall(r"\((\d+) weight tensors read;", log)]


def test_one_stage_matches_the_reference_bit_for_bit(tiny_single_run, tiny_reference):
    """One plain process (the session's run of the README command) is the one-stage pipeline."""
    cwd, result = tiny_single_run
    assert torch.equal(load_file(cwd / "tiny.safetensors")["latents"], tiny_reference)
    transformer = SafetensorsFolder(TINY_WAN_PATH / "transformer")
    assert _tensors_read(result.stdout + result.stderr) == [len(transformer.keys())]


@pytest.mark.parametrize("ranks", [2, 3])
def test_stages_match_the_reference_bit_for_bit(tmp_path, tiny_reference, ranks):
    result = launch(ranks, tmp_path, "--config", str(TINY_CONFIG), "--output", "video.mp4",
                    "--save-latents", "l.safetensors")
    assert torch.equal(load_file(tmp_path / "l.safetensors")["latents"], tiny_reference)
    assert (tmp_path / "video.mp4").is_file()
    # each rank reads only its stage's tensors, plus the small condition embedder every stage keeps
    read = _tensors_read(result.stdout + result.stderr)
    transformer = SafetensorsFolder(TINY_WAN_PATH / "transformer")
    embedder = sum(k.startswith("condition_embedder.") for k in transformer.keys())
    assert len(read) == ranks and sum(read) == len(transformer.keys()) + (ranks - 1) * embedder


def test_no_context_and_uniform_partition(tmp_path):
    """c = 0, 3 blocks of layers (+ embed, head) split uniformly over 2 stages."""
    cfg_overrides = dict(context=0, block_size=2, partition_method="uniform")
    cfg = load_config(TINY_CONFIG, cfg_overrides).dualparal
    config_file = tmp_path / "c0.json"
    raw = json.loads(TINY_CONFIG.read_text())
    raw["dualparal"].update(cfg_overrides)
    config_file.write_text(json.dumps(raw))
    launch(2, tmp_path, "--config", str(config_file), "--output", "v.mp4", "--save-latents", "l.safetensors")
    assert torch.equal(load_file(tmp_path / "l.safetensors")["latents"], reference_latents(cfg))
