"""A model folder is checked whole before any weights load (one line each), the work of a job is
estimated up front, and model-level settings that cannot run here are refused."""

import shutil
from pathlib import Path

import pytest
from conftest import RANDOM_TINY, TINY_CONFIG

from ds_dualparal.cli.checks import check_model
from ds_dualparal.config import ConfigError, load_config
from ds_dualparal.pipeline.estimate import estimate, refusal
from ds_dualparal.wan.model import WanConfig
from ds_dualparal.wan.modelcheck import check_model_folder, weights_fingerprint
from ds_dualparal.wan.weights import ModelError, SafetensorsFolder


@pytest.fixture(scope="module")
def cfg():
    return load_config(TINY_CONFIG, {"model": str(TINY_WAN_PATH)}).dualparal


TINY_WAN_PATH = RANDOM_TINY  # shard names, sizes and the estimates below are the random tiny model's


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def write(path, text):
    path.write_text(text)


SHARD = "transformer/diffusion_pytorch_model-00002-of-00004.safetensors"
INDEX = "transformer/diffusion_pytorch_model.safetensors.index.json"
DAMAGE = {
    # id: (what to do to a copy of the tiny model, words the one error must hold)
    "truncated-shard": (lambda m: truncate(m / SHARD), [SHARD, "not a whole safetensors file", "truncated"]),
    "truncated-vae": (lambda m: truncate(m / "vae/diffusion_pytorch_model.safetensors", 0.99),
                      ["vae/diffusion_pytorch_model.safetensors", "truncated"]),
    "vae-only-bin": (lambda m: (m / "vae/diffusion_pytorch_model.safetensors").rename(
        m / "vae/diffusion_pytorch_model.bin"), ["vae", "no diffusion_pytorch_model.safetensors", "never pickles"]),
    "text-encoder-only-bin": (lambda m: (m / "text_encoder/model.safetensors").rename(
        m / "text_encoder/pytorch_model.bin"), ["text_encoder", "no model.safetensors", "pytorch_model.bin"]),
    "transformer-config": (lambda m: write(m / "transformer/config.json", '{"num_layers": "two"'),
                           ["transformer/config.json", "not valid JSON"]),
    "transformer-config-fields": (lambda m: write(m / "transformer/config.json", '{"num_layers": 2}'),
                                  ["transformer/config.json", "not a Wan transformer config"]),
    "weight-map-list": (lambda m: write(m / INDEX, '{"weight_map": ["a", "b"]}'), [INDEX, "'weight_map' must be"]),
    "weight-map-escapes": (lambda m: write(m / INDEX, '{"weight_map": {"a": "../vae/x.safetensors"}}'),
                           [INDEX, "not a file name"]),
    "tokenizer": (lambda m: write(m / "tokenizer/tokenizer.json", "{"), ["tokenizer/tokenizer.json", "not valid JSON"]),
    "tokenizer-content": (lambda m: write(m / "tokenizer/tokenizer.json", '{"model": 3}'),
                          ["tokenizer", "cannot load the tokenizer"]),
    "scheduler": (lambda m: write(m / "scheduler/scheduler_config.json", "[1]"),
                  ["scheduler/scheduler_config.json", "must be a JSON object"]),
    "scheduler-content": (lambda m: write(m / "scheduler/scheduler_config.json", '{"solver_order": "x"}'),
                          ["scheduler", "cannot make the unipc scheduler"]),
    "model-index": (lambda m: write(m / "model_index.json", '{"boundary_ratio": "high"}'),
                    ["model_index.json", "boundary_ratio"]),
}


@pytest.mark.parametrize("damage, words", DAMAGE.values(), ids=DAMAGE.keys())
def test_a_damaged_model_folder_is_one_line_before_loading(tmp_path, cfg, damage, words):
    model = shutil.copytree(TINY_WAN_PATH, tmp_path / "model")
    damage(model)
    with pytest.raises(ModelError) as info:
        check_model(cfg.with_overrides(model=str(model)))
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_the_tiny_model_passes_and_a_file_is_not_a_folder(tmp_path, cfg):
    assert check_model(cfg) == WanConfig.from_json(TINY_WAN_PATH / "transformer/config.json")
    with pytest.raises(ModelError, match="model folder /etc/passwd is not a folder"):
        check_model_folder(Path("/etc/passwd"))


def test_a_weight_map_that_is_not_a_mapping_is_a_checkpoint_error(tmp_path):
    folder = tmp_path / "transformer"
    folder.mkdir()
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text('{"weight_map": [1]}')
    with pytest.raises(ModelError, match="'weight_map' must map tensor names to file names"):
        SafetensorsFolder(folder)


def test_partition_and_attention_backend_that_cannot_run_here(cfg):
    with pytest.raises(ConfigError, match=r"partition_method: 'type:NoSuchLayer' matches none of the layer classes"):
        check_model(cfg.with_overrides(partition_method="type:NoSuchLayer"))
    check_model(cfg.with_overrides(partition_method="type:block|head"))
    with pytest.raises(ConfigError, match="attention_backend: 'flash' needs a GPU"):
        check_model(cfg.with_overrides(attention_backend="flash"), device_type="cpu")
    check_model(cfg.with_overrides(attention_backend="_native_math"), device_type="cpu")


@pytest.mark.parametrize("backend,module", [("flash_4", "flash_attn.cute"), ("flash", "flash_attn"),
                                            ("sage", "sageattention"), ("xformers", "xformers"),
                                            ("_flash_3", "flash_attn_interface")])
def test_a_backend_without_its_package_is_a_config_error(cfg, monkeypatch, backend, module):
    """Named before loading, in one line, instead of diffusers' traceback at the first attention call."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.split(".")[0] == module.split(".")[0] else find_spec(name, *a))
    with pytest.raises(ConfigError, match=rf"^dualparal.attention_backend: '{backend}' needs the module {module} "
                                          r"\(.+\), which is not installed$"):
        check_model(cfg.with_overrides(attention_backend=backend), device_type="cuda")
    with pytest.raises(ConfigError, match=f"attention_backend: '{backend}' needs a GPU"):
        check_model(cfg.with_overrides(attention_backend=backend), device_type="cpu")


def test_the_fingerprint_follows_the_weights_not_the_path(tmp_path):
    copy = shutil.copytree(TINY_WAN_PATH, tmp_path / "copy")
    assert weights_fingerprint(copy) == weights_fingerprint(TINY_WAN_PATH)
    shard = copy / SHARD
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # one byte of the last tensor: same header, same size
    shard.write_bytes(bytes(data))
    assert weights_fingerprint(copy) != weights_fingerprint(TINY_WAN_PATH)
    other = shutil.copytree(TINY_WAN_PATH, tmp_path / "other")
    (other / "vae" / "config.json").write_text((other / "vae" / "config.json").read_text() + " ")
    assert weights_fingerprint(other) == weights_fingerprint(TINY_WAN_PATH)  # the VAE does not make the latents


def test_work_is_estimated_and_what_cannot_fit_is_refused(cfg):
    wan = WanConfig.from_json(TINY_WAN_PATH / "transformer/config.json")
    tiny = estimate(cfg, wan)
    assert (tiny.latent_frames, tiny.blocks, tiny.steps) == (6, 2, cfg.num_inference_steps)
    assert refusal(tiny, 2**30) is None
    assert "block-steps" in tiny.describe() and "TFLOP" in tiny.describe()
    long = refusal(estimate(cfg.with_overrides(num_frames=1_000_000_001), wan), 128 * 2**30)
    assert long.startswith("needs at least 1.91e+03 GiB on the first stage") and "the device has 128 GiB" in long
    wide = estimate(cfg.with_overrides(height=16384, width=16384), wan)
    assert wide.window_tokens == 5 * 1024 * 1024 and wide.tflop > 1e5  # said up front, in the log
    assert refusal(wide, 16 * 2**30).startswith("needs at least 21.6 GiB")
