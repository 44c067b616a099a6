"""The pipelined engine under DeepSpeed's launcher on CPU ranks (gloo) against the sequential reference.

Bit-identical latents are the contract: every block-step computes the same values whatever the
partition, so 1, 2 or 3 stages (and data-parallel replicas) must match the reference exactly.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ds_dualparal.config import load_config
from ds_dualparal.files import free_port
from ds_dualparal.pipeline.generation import reference_latents
from ds_dualparal.wan.weights import TINY_WAN_PATH, SafetensorsFolder

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "ds_configs" / "tiny.json"


def launch(ranks: int, workdir: Path, *args: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
        "--master_port", str(free_port()), str(ROOT / "launch" / "generate.py"), *args,
    ]
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def tiny_reference():
    cfg = load_config(TINY).dualparal
    assert cfg.latent_frames == 6 and cfg.block_size == 2 and cfg.context == 1  # K = 2, ragged block 0 of 4
    return reference_latents(cfg)


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_stages_match_the_reference_bit_for_bit(tmp_path, tiny_reference, ranks):
    result = launch(ranks, tmp_path, "--config", str(TINY), "--output", "video.mp4", "--save-latents", "l.safetensors")
    assert torch.equal(load_file(tmp_path / "l.safetensors")["latents"], tiny_reference)
    assert (tmp_path / "video.mp4").is_file()
    # each rank reads only its stage's tensors, plus the small condition embedder every stage keeps
    read = [int(n) for n in re.findall(r"\((\d+) weight tensors read;", result.stdout + result.stderr)]
    transformer = SafetensorsFolder(TINY_WAN_PATH / "transformer")
    embedder = sum(k.startswith("condition_embedder.") for k in transformer.keys())
    assert len(read) == ranks and sum(read) == len(transformer.keys()) + (ranks - 1) * embedder


def test_no_context_and_uniform_partition(tmp_path):
    """c = 0, 3 blocks of layers (+ embed, head) split uniformly over 2 stages."""
    cfg_overrides = dict(context=0, block_size=2, partition_method="uniform")
    cfg = load_config(TINY, cfg_overrides).dualparal
    config_file = tmp_path / "c0.json"
    raw = json.loads(TINY.read_text())
    raw["dualparal"].update(cfg_overrides)
    config_file.write_text(json.dumps(raw))
    launch(2, tmp_path, "--config", str(config_file), "--output", "v.mp4", "--save-latents", "l.safetensors")
    assert torch.equal(load_file(tmp_path / "l.safetensors")["latents"], reference_latents(cfg))


def test_two_replicas_of_two_stages(tmp_path):
    """dp = 2 x pp = 2 on 4 ranks: each replica generates its own job, both equal the reference."""
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(
        json.dumps({"prompt": "a red fox", "seed": 1, "save_latents": "a.safetensors"}) + "\n"
        + json.dumps({"prompt": "a blue bird", "seed": 2, "save_latents": "b.safetensors"}) + "\n"
    )
    result = launch(4, tmp_path, "--config", str(TINY), "--stages", "2", "--jobs", str(jobs), "--output-dir", "out")
    base = load_config(TINY).dualparal
    for name, prompt, seed in (("a", "a red fox", 1), ("b", "a blue bird", 2)):
        saved = next(tmp_path.rglob(f"{name}.safetensors"))
        want = reference_latents(base.with_overrides(prompt=prompt, seed=seed))
        assert torch.equal(load_file(saved)["latents"], want)
    log = result.stdout + result.stderr
    assert "replica 0/2" in log and "replica 1/2" in log
