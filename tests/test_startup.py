"""What `launch/generate.py` does before its first block-step, kept from growing back: each test pins
one cut of the command's start-up (docs/running.md, "Start-up")."""

import gc
import json
import os
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import torch
from conftest import ROOT, TINY_CONFIG

from ds_dualparal.wan.weights import TINY_WAN_PATH


def _encoders(monkeypatch, text, keep=None):
    """Weak references to every text encoder `text.encode_prompts` loads (and `keep(encoder)` run on each)."""
    from transformers import UMT5EncoderModel

    loaded = []
    load = UMT5EncoderModel.from_pretrained

    def from_pretrained(*args, **kwargs):
        encoder = load(*args, **kwargs)
        loaded.append(weakref.ref(encoder))
        if keep is not None:
            keep(encoder)
        return encoder

    monkeypatch.setattr(UMT5EncoderModel, "from_pretrained", from_pretrained)
    return loaded


def _counted_collections(monkeypatch, text):
    calls = []
    collect = gc.collect
    monkeypatch.setattr(text.gc, "collect", lambda *args: calls.append(args) or collect(*args))
    return calls


def test_the_text_encoder_is_freed_without_a_full_collection(monkeypatch):
    """Reference counting frees the encoder and its tensors as the encoding ends, so the ~0.25 s collection
    over the whole heap is not needed; the embeddings are those of a run that collected."""
    from ds_dualparal.wan import text

    triples = [("a red circle moves sideways over a striped background", "", True), ("a blue square", "", False)]
    expected = text.encode_prompts(TINY_WAN_PATH, triples, "cpu", torch.float32)
    loaded = _encoders(monkeypatch, text)
    collections = _counted_collections(monkeypatch, text)
    embeddings = text.encode_prompts(TINY_WAN_PATH, triples, "cpu", torch.float32)
    assert len(loaded) == 1 and loaded[0]() is None  # freed before encode_prompts returned
    assert collections == []
    assert all(torch.equal(a, b) for a, b in zip(embeddings, expected, strict=True))


def test_an_encoder_held_by_a_cycle_is_still_collected(monkeypatch):
    """The collection still runs when something holds the encoder in a reference cycle."""
    from ds_dualparal.wan import text

    def in_a_cycle(encoder):
        cycle = [encoder]
        cycle.append(cycle)

    loaded = _encoders(monkeypatch, text, keep=in_a_cycle)
    collections = _counted_collections(monkeypatch, text)
    enabled = gc.isenabled()
    gc.disable()  # no automatic collection in between: only encode_prompts' own may free the cycle
    try:
        text.encode_prompts(TINY_WAN_PATH, [("a red circle", "", True)], "cpu", torch.float32)
    finally:
        if enabled:
            gc.enable()
    assert len(collections) == 1
    assert len(loaded) == 1 and loaded[0]() is None


def _python(code: str) -> str:
    """`code` run by a fresh interpreter (nothing imported yet); its stdout."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_a_cpu_world_starts_without_probing_deepspeeds_op_table():
    """A CPU process group starts without DeepSpeed's probe of every op builder (~0.1 s, setuptools'
    modules): the one entry the start reads stands in, and the table is unread afterwards, so a later
    reading still gets DeepSpeed's own probe (and marks the shared-memory op as the CPU has it)."""
    out = _python(
        "import json, sys\n"
        "from ds_dualparal.pipeline import comm\n"
        "import deepspeed.ops\n"
        "import importlib\n"
        "ds_torch = importlib.import_module('deepspeed.comm.torch')\n"
        "built = []\n"
        "build = ds_torch.build_shm_op\n"
        "ds_torch.build_shm_op = lambda: built.append(build()) or built[-1]\n"
        "comm.init_process(60)\n"
        "after = dict(unread='__compatible_ops__' not in vars(deepspeed.ops), built=[b is None for b in built],\n"
        "             setuptools=sorted(m for m in sys.modules if m.split('.')[0] in ('setuptools', 'distutils')))\n"
        "after['probed'] = comm._SHM_OP in deepspeed.ops.__compatible_ops__\n"
        "comm.shutdown()\n"
        "print(json.dumps(after))\n"
    )
    after = json.loads(out.splitlines()[-1])
    assert after["built"] == [True]  # DeepSpeed asked for the op once and got none
    assert after["unread"] and after["setuptools"] == []
    assert after["probed"]


def _tokenizer_reads(monkeypatch):
    from transformers import AutoTokenizer

    reads = []
    load = AutoTokenizer.from_pretrained
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda folder, *a, **k: reads.append(Path(folder)) or load(folder, *a, **k))
    return reads


def test_a_first_stage_reads_the_tokenizer_once(monkeypatch):
    """The model check reads the tokenizer (every rank); a rank that encodes keeps it and its encoding
    takes it instead of reading the folder again (UMT5's tokenizer is ~1 s); the embeddings are the same."""
    from ds_dualparal.cli.checks import check_model
    from ds_dualparal.config import DualParalConfig
    from ds_dualparal.wan import text

    cfg = DualParalConfig(model=str(TINY_WAN_PATH))
    expected = text.encode_jobs(TINY_WAN_PATH, [cfg], "cpu", torch.float32)
    reads = _tokenizer_reads(monkeypatch)
    check_model(cfg, keep_tokenizer=True)
    [embeddings] = text.encode_jobs(TINY_WAN_PATH, [cfg], "cpu", torch.float32)
    assert reads == [TINY_WAN_PATH / "tokenizer"]
    assert torch.equal(embeddings, expected[0])
    assert text._kept is None  # taken, not held for the rest of the run
    check_model(cfg)  # a rank that does not encode keeps nothing
    assert text._kept is None
    text.encode_jobs(TINY_WAN_PATH, [cfg], "cpu", torch.float32)
    assert len(reads) == 3


def test_a_tokenizer_changed_after_the_check_is_read_again(monkeypatch, tmp_path):
    from ds_dualparal.wan import text

    folder = tmp_path / "tokenizer"
    shutil.copytree(TINY_WAN_PATH / "tokenizer", folder)
    reads = _tokenizer_reads(monkeypatch)
    kept = text.load_tokenizer(folder, keep=True)
    config = folder / "tokenizer_config.json"
    config.write_text(config.read_text().replace('"model_max_length": 512', '"model_max_length": 77'))
    again = text.load_tokenizer(folder)
    assert len(reads) == 2 and again is not kept and again.model_max_length == 77
    assert text.load_tokenizer(folder) is not again  # nothing kept without keep=True
    assert len(reads) == 3


def test_only_a_first_stage_keeps_the_tokenizer(workdir):
    """`_decide` (the checks before the process group) keeps the tokenizer on the ranks that encode:
    rank % stages == 0; 4 ranks of 2 stages are 2 replicas whose first stages are ranks 0 and 2."""
    from ds_dualparal.cli import main
    from ds_dualparal.cli.args import build_parser, config_from_args
    from ds_dualparal.wan import text

    args = build_parser().parse_args(["--config", str(TINY_CONFIG), "--output", str(workdir / "t.mp4"), "--stages", "2"])
    cfg = config_from_args(args)
    kept = []
    for rank in range(4):
        error, *_ = main._decide(args, cfg, rank, 4)
        assert error is None
        kept.append(text._kept is not None)
        text._kept = None
    assert kept == [True, False, True, False]


HEAVY = ("torch", "deepspeed", "diffusers", "transformers", "peft", "accelerate", "imageio", "safetensors")


def test_the_entry_module_and_a_flag_mistake_import_no_runtime():
    """`launch/generate.py` imports only `cli.main` before its main runs: flags, config and a mistake in
    them are answered without torch, DeepSpeed, diffusers or transformers (a fifth of a second, where
    their imports take several seconds)."""
    out = _python(
        "import json, sys\n"
        f"heavy = {HEAVY!r}\n"
        "loaded = lambda: sorted({m.split('.')[0] for m in sys.modules} & set(heavy))\n"
        "import ds_dualparal.cli.main as main\n"
        "at_import = loaded()\n"
        f"code = main.main(['--config', {str(TINY_CONFIG)!r}, '--frames', '10'])\n"
        "print(json.dumps([at_import, code, loaded()]))\n"
    )
    at_import, code, after_mistake = json.loads(out.splitlines()[-1])
    assert at_import == [] and code == 2 and after_mistake == []


def test_a_hub_id_is_asked_of_the_hub_once_per_process(monkeypatch):
    """The checks, the cost estimate and the load resolve the model four times on rank 0 before the first
    block-step; a hub id costs a request to the hub each time (even with the files cached), so it is
    asked once, and all of them read the same snapshot. A failure is not kept: it is asked again."""
    import huggingface_hub
    import pytest

    from ds_dualparal.wan import weights

    calls = []

    def snapshot_download(repo_id, *args, **kwargs):
        calls.append(repo_id)
        if repo_id == "org/offline":
            raise OSError("no connection")
        return str(TINY_WAN_PATH)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    weights._download.cache_clear()
    try:
        assert [weights.resolve_model("org/model") for _ in range(4)] == [TINY_WAN_PATH] * 4
        assert calls == ["org/model"]
        for _ in range(2):
            with pytest.raises(weights.ModelError, match="^model 'org/offline': not a local folder and could not be "
                                                         r"downloaded \(no connection\)$"):
                weights.resolve_model("org/offline")
        assert calls == ["org/model", "org/offline", "org/offline"]
        assert weights.resolve_model(None) == TINY_WAN_PATH and weights.resolve_model(str(TINY_WAN_PATH)) == TINY_WAN_PATH
        assert len(calls) == 3  # local folders never ask
    finally:
        weights._download.cache_clear()
