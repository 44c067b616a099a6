"""launch/bench.py on the CPU with the debug shapes: `--image --baseline` runs DualParal and diffusers'
WanImageToVideoPipeline side by side in one command; flags that cannot run together are refused."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import ROOT, launch_script, run, run_forked

BENCH = ROOT / "launch" / "bench.py"


def _bench_module():
    return launch_script("bench.py")


SMOKE = ["--cases", "smoke:5:2", "--height", "64", "--width", "64", "--block-size", "4", "--context", "2",
         "--repeats", "1"]


def check_rows(out, image_tokens: int) -> None:
    # 5 latent frames (17 video frames) in one block (B = 4, c = 2): the same tokens as the full sequence,
    # so both rows count the same FLOPs
    ours, theirs = [json.loads(line) for line in out.read_text().splitlines()]
    assert ours["kind"] == "dualparal" and ours["image"] and ours["blocks"] == 1
    assert theirs["kind"] == "diffusers" and theirs["pipeline"] == "WanImageToVideoPipeline" and theirs["image"]
    assert theirs["seconds"] > 0 and all(t > 0 for t in theirs["times"]) and theirs["warmup_seconds"] > 0
    assert theirs["image_tokens"] == image_tokens
    for key in ("latent_frames", "height", "width", "steps"):
        assert theirs[key] == ours[key], key
    assert theirs["tflop"] == pytest.approx(ours["tflop"])


def test_image_baseline_runs_beside_dualparal(tmp_path):
    """The driver as users run it: its workers are processes of their own."""
    out = tmp_path / "bench.jsonl"
    result = run([sys.executable, str(BENCH), "--gpus", "1", "--baseline", "--image", "--shape", "debug-i2v", *SMOKE,
                  "--out", str(out)], tmp_path, timeout=240)
    assert result.returncode == 0, result.explain()
    check_rows(out, image_tokens=257)
    table = result.stdout[result.stdout.index("run        kind"):]
    assert "smoke      diffusers" in table and "smoke      dualparal" in table
    assert "WanImageToVideoPipeline; the image condition is made before the timing" in table


def test_ti2v_and_its_baseline_are_timed_alike(tmp_path):
    """Wan2.2-TI2V (expand_timesteps, 48 channels): the driver's two workers, forked (conftest.run_forked)."""
    out = tmp_path / "bench.jsonl"
    common = ["--image", "--shape", "debug-ti2v", *SMOKE, "--out", out]
    for role in ("--worker", "--baseline-worker"):
        result = run_forked(BENCH, 1, [role, *common], tmp_path, timeout=240)
        assert result.returncode == 0, result.explain()
    check_rows(out, image_tokens=0)
    assert "smoke      diffusers" in _bench_module().table([json.loads(line) for line in out.read_text().splitlines()])


@pytest.mark.parametrize("argv, error", [
    (["--shape", "1.3b", "--image"], "--image needs an image-to-video shape (i2v-14b, ti2v-5b, debug-i2v, debug-ti2v)"),
    (["--shape", "i2v-14b", "--baseline"], "--shape i2v-14b takes image condition channels (Wan2.1-I2V): add --image"),
    (["--shape", "ti2v-5b", "--image", "--real-path"], "--real-path does not run with --image: with random weights"),
])
def test_flags_that_cannot_run_together_are_refused(argv, error, capsys):
    with pytest.raises(SystemExit) as exit_:
        _bench_module().main(argv)
    assert exit_.value.code == 2
    assert error in capsys.readouterr().err.strip().splitlines()[-1]


def test_write_random_wan_writes_a_folder_the_command_runs(tmp_path):
    """launch/write_random_wan.py (the real command's timing on a machine without the hub): the debug
    shape's folder passes the model check and generates; an existing folder is refused."""
    from diffusers import WanPipeline

    from conftest import TINY_CONFIG, run_generate

    writer = launch_script("write_random_wan.py")
    folder = tmp_path / "random-wan"
    assert writer.main(["--shape", "debug", "--out", str(folder), "--device", "cpu"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["random-wan"]  # nothing partial left beside it
    pipe = WanPipeline.from_pretrained(folder)
    assert pipe.transformer.config.num_layers == writer.SHAPES["debug"]["num_layers"]
    from safetensors.torch import load_file

    stored = {name: load_file(next((folder / name).glob("*.safetensors"))) for name in ("transformer", "vae")}
    assert stored["transformer"]["proj_out.weight"].dtype == torch.bfloat16  # as from_pretrained(bf16) leaves it
    assert all(t.dtype == torch.float32 for t in stored["vae"].values())
    assert pipe.transformer.config.text_dim == pipe.text_encoder.config.d_model
    result = run_generate("--config", TINY_CONFIG, "--model", folder, "--frames", "5", "--height", "32",
                          "--width", "32", "--output", "random.mp4", cwd=tmp_path)
    assert result.returncode == 0, result.explain()
    assert (tmp_path / "random.mp4").stat().st_size > 0
    with pytest.raises(SystemExit) as refused:
        writer.main(["--shape", "debug", "--out", str(folder)])
    assert refused.value.code == 2


def test_profile_attention_debug_times_each_shape_and_reports_a_backend_that_cannot_run(tmp_path):
    """launch/profile_attention.py's CPU smoke run: each anchor window shape (scaled down) is timed with the math
    kernel; flash_4 cannot run on a CPU, and its rows say so instead of failing the run."""
    out = tmp_path / "attention.json"
    assert launch_script("profile_attention.py").main(["--debug", "--repeats", "2", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["shape"], r["backend"], r["queries"], r["keys"]) for r in rows] == [
        ("16+8 cached frames", "math", 96, 144), ("16+8 cached frames", "flash_4", 96, 144),
        ("16 frames (last block)", "math", 96, 96), ("16 frames (last block)", "flash_4", 96, 96)]
    math, flash = rows[0::2], rows[1::2]
    assert all(r["ms"] > 0 and r["tflops"] > 0 and r["first_s"] > 0 for r in math)
    assert all(r["error"] and "ms" not in r for r in flash)
