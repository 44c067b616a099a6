"""run_job on a stand-in generator (no pipeline, the tiny VAE): a job whose outputs cannot be written
or whose latents are not finite fails alone, leaves nothing at a final name, and the manifest says so."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_CONFIG
from deepspeed.runtime.pipe.topology import ProcessTopology
from diffusers import AutoencoderKLWan

from ds_dualparal.cli.args import build_parser
from ds_dualparal.cli.jobs import MANIFEST, Job
from ds_dualparal.cli.runner import JobFailed, OutputOptions, run_job
from ds_dualparal.config import load_config
from ds_dualparal.files import OutputError
from ds_dualparal.pipeline.engine import GenerationRequest
from ds_dualparal.pipeline.timeline import BlockTimeline
from ds_dualparal.wan.weights import TINY_WAN_PATH


@pytest.fixture(scope="module")
def vae():
    return AutoencoderKLWan.from_pretrained(TINY_WAN_PATH / "vae", dtype=torch.float32, use_safetensors=True).eval()


class FakeGenerator:
    """The first stage of `stages`: each block becomes final once, with `values` as its latents."""

    def __init__(self, vae, stages=1, values=0.1):
        self.vae, self.values, self.rank, self.is_first = vae, values, 0, True
        self.device = torch.device("cpu")
        self.topology = ProcessTopology(axes=["data", "pipe"], dims=[1, stages])
        self.blocks_run = 0
        self.folder = None  # as with random weights: no model folder

    def request(self, cfg, text=None, **options):
        timeline = BlockTimeline(cfg.latent_frames, cfg.block_size, cfg.context, cfg.num_inference_steps)
        return GenerationRequest(SimpleNamespace(timeline=timeline, cfg=cfg), text, **options)

    def generate(self, request):
        timeline, cfg = request.plan.timeline, request.plan.cfg
        blocks = []
        for b in range(timeline.num_blocks):
            block = torch.full((1, 16, timeline.block_len(b), cfg.height // 8, cfg.width // 8), self.values)
            if request.on_block_done is not None:
                request.on_block_done(b, block)
            self.blocks_run += 1
            blocks.append(block)
        return SimpleNamespace(latents=torch.cat(blocks, dim=2), seconds=0.01)


def batch_job(out: Path, **overrides):
    cfg = load_config(TINY_CONFIG).dualparal.with_overrides(
        num_frames=9, num_inference_steps=1, block_size=1, context=0, output=str(out / "a.mp4"), **overrides)
    return Job(1, "a", Path(cfg.output), cfg, relative="a.mp4")


def batch_args(out, *extra):
    args = build_parser().parse_args(["--jobs", "j.jsonl", "--output-dir", str(out), *map(str, extra)])
    return OutputOptions.from_args(args)


def records(out):
    return [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]


@pytest.mark.parametrize("stages", [1, 2])
def test_non_finite_latents_fail_the_job_and_leave_nothing(tmp_path, vae, stages):
    out = tmp_path / "out"
    generator = FakeGenerator(vae, stages, values=float("nan"))
    job = batch_job(out, save_latents=str(out / "a.safetensors"))
    result = run_job(generator, job, None, batch_args(out, "--save-frames", tmp_path / "frames"))
    assert not result.ok and "block 0: " in result.error and "not finite (NaN or inf)" in result.error
    # one stage stops at once; with more, the first stage runs on in step with the others
    assert generator.blocks_run == (0 if stages == 1 else 3)
    assert [r["status"] for r in records(out)] == ["failed"]
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST]
    assert not list((tmp_path / "frames").rglob("*"))  # no frames either (the parent folder may be made)


@pytest.mark.parametrize("stages", [1, 2])
def test_an_encoder_write_error_fails_the_job_and_the_batch_goes_on(tmp_path, vae, monkeypatch, stages):
    fake = tmp_path / "ffmpeg"
    fake.write_text("#!/bin/sh\ncat > /dev/null\necho 'Error: No space left on device' >&2\nexit 1\n")
    fake.chmod(0o755)
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr("imageio_ffmpeg.get_ffmpeg_exe", lambda: str(fake))
        failed = run_job(FakeGenerator(vae, stages), batch_job(out), None, batch_args(out))
    assert not failed.ok and failed.error == f"cannot write {out / 'a.mp4'}: Error: No space left on device"
    assert not (out / "a.mp4").exists()
    done = run_job(FakeGenerator(vae, stages), batch_job(out), None, batch_args(out))  # the next job runs
    assert done.ok and (out / "a.mp4").is_file()
    assert [r["status"] for r in records(out)] == ["failed", "done"]


@pytest.mark.parametrize("stages", [1, 2])
def test_an_output_that_cannot_be_opened_fails_the_job_in_step_with_the_other_stages(tmp_path, vae, stages):
    """The job's mp4 appeared after the plan (another writer): the job fails before its generation
    starts on the first stage, but with more stages the first stage still runs it with the others
    (they are already in it), so the next job starts in step; nothing is written."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.mp4").write_bytes(b"someone else's")
    generator = FakeGenerator(vae, stages)
    result = run_job(generator, batch_job(out), None, batch_args(out, "--save-frames", tmp_path / "frames"))
    assert not result.ok and "already exists" in result.error
    assert generator.blocks_run == (0 if stages == 1 else 3)
    assert (out / "a.mp4").read_bytes() == b"someone else's"
    assert [r["status"] for r in records(out)] == ["failed"]
    assert not (tmp_path / "frames").exists()


def test_a_single_video_write_error_is_a_failed_result_not_a_traceback(tmp_path, vae, monkeypatch):
    monkeypatch.setattr("ds_dualparal.cli.runner.save_file", _disk_full)
    out = tmp_path / "out"
    job = batch_job(out, save_latents=str(out / "a.safetensors"))
    args = build_parser().parse_args(["--output", str(job.output)])
    result = run_job(FakeGenerator(vae), job, None, OutputOptions.from_args(args))
    assert not result.ok and result.error == f"cannot write {out / 'a.safetensors'}: No space left on device"
    assert list(out.iterdir()) == []


def _disk_full(tensors, path, metadata=None):
    Path(path).write_bytes(b"half")
    raise OSError(28, "No space left on device")


def test_check_finite():
    from ds_dualparal.cli.runner import check_finite

    check_finite(0, torch.zeros(2))
    with pytest.raises(JobFailed, match="block 3: 1 of 2 latent values are not finite"):
        check_finite(3, torch.tensor([0.0, float("inf")]))
    assert issubclass(OutputError, OSError)


@pytest.mark.parametrize("device,stages,inline", [("cuda", 1, True), ("cuda", 2, False), ("cpu", 1, False)])
def test_a_single_stage_on_cuda_decodes_inline_on_the_pipelines_stream(vae, monkeypatch, device, stages, inline):
    """generate_streaming's choice (output/stream.py says why): inline, on the generator's stream, only where one
    stage has the GPU to itself. The decode itself runs here on the CPU; BlockOutput is watched, not replaced."""
    from ds_dualparal.cli import runner
    from ds_dualparal.output.stream import BlockOutput

    made = []

    def watched(decoder, sinks, _device, inline=False, stream=None):
        made.append((inline, stream))
        return BlockOutput(decoder, sinks, torch.device("cpu"), inline=inline)

    monkeypatch.setattr(runner, "BlockOutput", watched)
    generator = FakeGenerator(vae, stages)
    generator.device, generator.stream = torch.device(device), "the pipeline's stream"
    job = batch_job(Path("unused"))
    frames = []
    _, written = runner.generate_streaming(generator, generator.request(job.config), [lambda f, first: frames.append(f)])
    assert made == [(inline, "the pipeline's stream" if inline else None)]
    assert written == sum(len(f) for f in frames) == 9
