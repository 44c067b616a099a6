"""`launch/generate.py` as users run it: the mp4, latents and frames it writes, and every mistake it refuses."""

import shutil
import sys

import imageio.v3 as iio
import pytest
from conftest import TINY_CONFIG, run_deepspeed, run_generate, run_main
from safetensors.torch import load_file

from ds_dualparal.cli.args import build_parser, config_from_args
from ds_dualparal.config import FLAGS, DualParalConfig
from ds_dualparal.wan.weights import TINY_WAN_PATH

# tiny.json: 21 video frames (6 latent frames) of 64x64, 16 latent channels.
FRAMES, HEIGHT, WIDTH = 21, 64, 64


def test_main_command_writes_mp4_latents_and_frames(tiny_single_run):
    cwd, result = tiny_single_run
    video = iio.imread(cwd / "tiny.mp4")
    assert video.shape == (FRAMES, HEIGHT, WIDTH, 3)
    latents = load_file(cwd / "tiny.safetensors")
    assert list(latents) == ["latents"]
    assert latents["latents"].shape == (1, 16, 6, 8, 8)
    frames = sorted((cwd / "frames").glob("*.png"))
    assert len(frames) == FRAMES
    assert iio.imread(frames[-1]).shape == (HEIGHT, WIDTH, 3)
    # Only the finished files are left: the mp4 was written under a temporary name.
    assert sorted(p.name for p in cwd.iterdir()) == ["frames", "tiny.mp4", "tiny.safetensors"]
    assert "done: 1 job(s)" in result.stdout + result.stderr


def test_the_run_ends_with_one_line_of_where_its_time_went(tiny_single_run):
    _, result = tiny_single_run
    lines = [line for line in (result.stdout + result.stderr).splitlines() if "ds_dualparal: time: " in line]
    assert len(lines) == 1, lines
    parts = {}
    for part in lines[0].split("time: ", 1)[1].split(", "):
        name, seconds, unit = part.rsplit(" ", 2)
        assert unit == "s"
        parts[name] = float(seconds)
    total = parts.pop("total")
    assert list(parts) == ["start-up", "checks", "loading", "encoding", "generation", "last decode", "summary"]
    assert abs(sum(parts.values()) - total) <= 0.05 * (len(parts) + 1)  # each rounded to 0.1 s
    # (forked from the session's forkserver, the runtime already imported: a short start-up)
    assert min(parts.values()) >= 0 and 0 < total < 180  # run_generate's timeout


def test_existing_output_is_refused_then_replaced_with_overwrite(workdir):
    output = workdir / "video.mp4"
    output.write_bytes(b"not a video")
    # 5 frames = 2 latent frames: one block, one step; the cheapest real generation.
    args = ("--config", TINY_CONFIG, "--output", "video.mp4", "--frames", 5, "--steps", 1)

    refused = run_main(*args, cwd=workdir)
    assert refused.returncode == 2, refused.explain()
    assert _one_line(refused.stderr) == "generate.py: error: --output: video.mp4 already exists; pass --overwrite to replace it"
    assert output.read_bytes() == b"not a video"

    replaced = run_generate(*args, "--overwrite", cwd=workdir)
    assert replaced.returncode == 0, replaced.explain()
    assert iio.imread(output).shape == (5, HEIGHT, WIDTH, 3)
    assert sorted(p.name for p in workdir.iterdir()) == ["video.mp4"]


def _one_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture(scope="module")
def broken_models(tmp_path_factory):
    """Copies of the tiny checkpoint, one without its VAE, one without a transformer shard."""
    root = tmp_path_factory.mktemp("models")
    no_vae = shutil.copytree(TINY_WAN_PATH, root / "no_vae")
    shutil.rmtree(no_vae / "vae")
    no_shard = shutil.copytree(TINY_WAN_PATH, root / "no_shard")
    shard = sorted((no_shard / "transformer").glob("*-of-*.safetensors"))[-1]  # holds the head: the last stage's
    shard.unlink()
    truncated_vae = shutil.copytree(TINY_WAN_PATH, root / "truncated_vae")
    vae = truncated_vae / "vae" / "diffusion_pytorch_model.safetensors"
    vae.write_bytes(vae.read_bytes()[:-1000])
    return {"no_vae": no_vae, "no_shard": no_shard, "shard": shard.name, "truncated_vae": truncated_vae}


def _write(folder, name, text):
    path = folder / name
    path.write_text(text)
    return path


BAD_INPUTS = {
    # id: (flags after --config tiny.json --output out.mp4, words the one line must hold)
    "frames": (["--frames", "20"], ["--frames", "20", "4k+1", "17", "21"]),
    "height": (["--height", "70"], ["--height", "70", "64", "80"]),
    "steps": (["--steps", "0"], ["--steps", ">= 1"]),
    "context": (["--context", "5", "--block-size", "2"], ["--context", "block_size"]),
    "dtype": (["--dtype", "fp8"], ["--dtype", "fp8", "float32", "bfloat16", "float16"]),
    "scheduler": (["--scheduler", "ddim"], ["--scheduler", "ddim", "unipc", "euler"]),
    "steps-not-int": (["--steps", "abc"], ["--steps", "abc", "int"]),
    "stages": (["--stages", "2"], ["--stages", "does not divide the world size (1)", "allowed: 1"]),
    "output-not-mp4": (["--output", "video.avi"], ["--output", "video.avi", ".mp4"]),
    "jobs-without-output-dir": (["--jobs", "jobs.jsonl"], ["--jobs", "--output-dir"]),
    "output-dir-without-jobs": (["--output-dir", "out"], ["--output-dir", "--jobs"]),
    "model-missing": (["--model", "/nonexistent"], ["/nonexistent", "does not exist"]),
    "model-without-vae": (["--model", "{no_vae}"], ["no_vae", "'vae'"]),
    "model-without-shard": (["--model", "{no_shard}"], ["{shard}", "missing"]),
    # found by a hostile probe (issue 16)
    "seed-past-64-bits": (["--seed", str(2**64)], ["--seed", str(2**64), "<= 9223372036854775807"]),
    "guidance-overflows": (["--guidance", "1e308"], ["--guidance", "<= 100"]),
    "abbreviated-flag": (["--frame", "21"], ["unrecognized arguments: --frame 21"]),
    "model-is-a-file": (["--model", "/etc/passwd"], ["/etc/passwd", "is not a folder"]),
    "truncated-vae": (["--model", "{truncated_vae}"], ["vae/diffusion_pytorch_model.safetensors", "truncated"]),
    "a-billion-frames": (["--frames", "1000000001"], ["--frames/--height/--width", "needs at least", "GiB"]),
}


@pytest.mark.parametrize("flags, words", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_flag_is_one_line_and_exit_2(workdir, broken_models, flags, words):
    flags = [f.format(**broken_models) for f in flags]
    words = [w.format(**broken_models) for w in words]
    result = run_main("--config", TINY_CONFIG, "--output", "out.mp4", *flags, cwd=workdir)
    assert result.returncode == 2, result.explain()
    line = _one_line(result.stderr)
    assert line.startswith("generate.py: error:")
    for word in words:
        assert word in line
    assert list(workdir.iterdir()) == []  # nothing written, not even a partial file


def test_config_file_mistakes(workdir):
    cases = {
        "missing.json": (None, ["missing.json", "not found"]),
        "broken.json": ('{"dualparal": {"height": 64,}}', ["broken.json", "invalid JSON", "line 1"]),
        "unknown.json": ('{"dualparal": {"hieght": 64}}', ["dualparal.hieght", "unknown field", "height"]),
        "wrong.json": ('{"dualparal": {"num_frames": 20}}', ["dualparal.num_frames", "17", "21"]),
    }
    configs = workdir.parent / "configs"
    configs.mkdir()
    for name, (text, words) in cases.items():
        path = configs / name if text is None else _write(configs, name, text)
        result = run_main("--config", path, "--output", "out.mp4", cwd=workdir)
        assert result.returncode == 2, result.explain()
        line = _one_line(result.stderr)
        for word in words:
            assert word in line, name
    assert list(workdir.iterdir()) == []


def test_every_setting_flag_comes_from_its_field():
    actions = {a.dest: a for a in build_parser()._actions}
    for flag, field in FLAGS.items():
        assert actions[flag].option_strings[0] == "--" + flag.replace("_", "-")  # --compile also has --no-compile
        assert actions[flag].help == DualParalConfig.model_fields[field].description
    args = build_parser().parse_args(["--frames", "17", "--guidance", "2.5", "--stages", "1", "--scheduler", "euler"])
    cfg = config_from_args(args)
    assert (cfg.num_frames, cfg.guidance_scale, cfg.pipeline_stages, cfg.scheduler) == (17, 2.5, 1, "euler")


def test_help_documents_every_flag(workdir):
    result = run_main("--help", cwd=workdir)
    assert result.returncode == 0, result.explain()
    flags = (
        "--config --model --prompt --negative-prompt --frames --height --width --steps --guidance --block-size "
        "--context --seed --dtype --output --save-latents --jobs --output-dir --resume --overwrite --save-frames "
        "--checkpoint-dir --checkpoint-every"
    ).split()
    for flag in flags:
        assert f"{flag} " in result.stdout or f"{flag}\n" in result.stdout, flag
    assert "--local_rank" not in result.stdout  # the launcher's, not the user's


def test_a_shard_missing_on_the_last_stage_stops_every_rank_with_one_line(workdir, broken_models):
    """Only rank 1 (stage 1 of 2) would read the missing shard; every rank checks the whole folder before
    loading, so rank 0 finds it too and says it once, and no rank waits for another."""
    result = run_deepspeed(2, "--config", TINY_CONFIG, "--output", "out.mp4", "--model", broken_models["no_shard"],
                           cwd=workdir)
    assert result.returncode == 2, result.explain()
    assert "Traceback" not in result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert errors == [f"generate.py: error: {broken_models['no_shard']}/transformer/{broken_models['shard']}: "
                      "shard listed in the index is missing"]
    assert list(workdir.iterdir()) == []



def test_a_machine_without_the_mp4_encoder_is_told_before_the_weights_load(workdir, monkeypatch):
    """No imageio-ffmpeg (as on the GPU machines here): one line, exit 2, nothing written, instead of a
    traceback at the first finished block."""
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # `import imageio_ffmpeg` raises ImportError
    run = run_main("--config", TINY_CONFIG, "--output", "v.mp4", cwd=workdir)
    assert run.returncode == 2, run.explain()
    assert run.stderr.startswith("generate.py: error: --output: writing the mp4 needs ffmpeg through the "
                                 "imageio-ffmpeg package (ModuleNotFoundError") and run.stderr.count("\n") == 1
    assert list(workdir.iterdir()) == []
