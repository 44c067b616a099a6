"""Hostile input: any jobs line gives a valid job or a failed one (never an exception), weights load
only from safetensors, and no code comes from a model folder. (Outputs outside --output-dir: test_jobs.py.)"""

import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
from conftest import ROOT, TINY_CONFIG, run_main
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ds_dualparal.cli.jobs import parse_job, read_jobs
from ds_dualparal.config import DualParalConfig, load_config
from ds_dualparal.wan.weights import TINY_WAN_PATH, ModelError, SafetensorsFolder

OUT = Path("/out")
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def base():
    return load_config(TINY_CONFIG).dualparal


def check_job(job, index):
    """What every parsed line must be: a runnable job inside OUT, or a failed one with a one-line error."""
    assert job.index == index
    if job.error is None:
        assert isinstance(job.config, DualParalConfig)
        assert Path(job.config.output) == job.output
        for path in [job.output] + ([Path(job.config.save_latents)] if job.config.save_latents else []):
            assert path.is_relative_to(OUT) and ".." not in path.parts
        assert "\x00" not in job.name and "/" not in job.name
        for value in (job.config.prompt, job.config.negative_prompt, job.name, str(job.output)):
            value.encode("utf-8")
    else:
        assert job.config is None
        assert isinstance(job.error, str) and job.error and "\n" not in job.error


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
# Objects whose keys are mostly real settings, so that values reach the config and path checks.
known_keys = st.sampled_from(
    ["name", "output", "save_latents", "prompt", "negative_prompt", "frames", "num_frames", "steps", "seed",
     "height", "width", "guidance", "block_size", "context", "scheduler", "noise", "fps", "model", "dtype"]
)
paths = st.sampled_from(["a.mp4", "../a.mp4", "/a.mp4", "a/../../b.mp4", "sub/./c.mp4", ".", "", "a\x00.mp4",
                         "\ud800.mp4", "x.safetensors", "C:\\a.mp4", "~/a.mp4"])
plausible = st.dictionaries(known_keys, json_values | paths | st.integers(-5, 100), max_size=6)


@FUZZ
@given(line=st.text(max_size=200))
def test_any_text_line_gives_a_job(base, line):
    check_job(parse_job(3, line, base, OUT), 3)


@FUZZ
@given(value=json_values | plausible)
def test_any_json_value_gives_a_job(base, value):
    check_job(parse_job(5, json.dumps(value), base, OUT), 5)


HOSTILE = {
    "deep-nesting": "[" * 100_000,  # past Python's recursion limit
    "deep-object": '{"prompt": ' * 5_000,
    "huge-int": '{"seed": ' + "9" * 5000 + "}",  # past int's digit limit
    "overflow-float": '{"seed": 1e999}',
    "nan": '{"guidance": NaN}',
    "infinity": '{"guidance": -Infinity}',
    "nul-name": '{"name": "a\\u0000b"}',
    "nul-output": '{"output": "a\\u0000.mp4"}',
    "nul-latents": '{"save_latents": "l\\u0000.safetensors"}',
    "surrogate-name": '{"name": "\\ud800"}',
    "surrogate-output": '{"output": "\\udfff.mp4"}',
    "long-prompt": '{"prompt": "' + "x" * 100_000 + '"}',
    "bom": "\ufeff{}",
    "trailing-nul": "{}\x00",
    "proto": '{"__proto__": {}}',
    "empty-key": '{"": 1}',
}


@pytest.mark.parametrize("line", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_lines_give_a_job(base, line):
    check_job(parse_job(1, line, base, OUT), 1)


def test_text_that_would_fail_once_the_batch_runs_fails_the_job_now(base):
    """A NUL in a file name fails at open(), a lone surrogate in the tokenizer: both after other jobs ran."""
    lines = {
        '{"name": "a\\u0000b"}': "name: 'a\\x00b' must not contain a NUL character",
        '{"output": "a\\u0000.mp4"}': "output: 'a\\x00.mp4' must not contain a NUL character",
        '{"save_latents": "\\ud800"}': "save_latents: holds a lone surrogate",
        '{"prompt": "a \\udfff"}': "prompt: holds a lone surrogate",
    }
    for line, error in lines.items():
        job = parse_job(1, line, base, OUT)
        assert job.config is None and job.error.startswith(error), (line, job.error)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300))
def test_any_jobs_file_gives_jobs_or_one_config_error(tmp_path, base, data):
    from ds_dualparal.config import ConfigError

    jobs_file = tmp_path / "jobs.jsonl"
    jobs_file.write_bytes(data)
    try:
        jobs = read_jobs(jobs_file, base, OUT)
    except ConfigError as err:
        assert "\n" not in str(err)
        return
    for job in jobs:
        check_job(job, job.index)


# ---- weights: safetensors only, and nothing executable from a model folder


class _Payload:
    """Unpickling this creates a file: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _pickled_weights(folder: Path, marker: Path) -> None:
    for name in ("diffusion_pytorch_model.bin", "pytorch_model.bin", "model.pt"):
        (folder / name).write_bytes(pickle.dumps(_Payload(marker)))


def test_a_component_with_only_pickled_weights_is_refused(tmp_path):
    marker = tmp_path / "unpickled"
    folder = tmp_path / "transformer"
    folder.mkdir()
    _pickled_weights(folder, marker)
    with pytest.raises(ModelError, match="no diffusion_pytorch_model.safetensors"):
        SafetensorsFolder(folder)
    assert not marker.exists()


def test_a_model_whose_transformer_is_pickled_is_refused_with_one_line(workdir, tmp_path):
    marker = tmp_path / "unpickled"
    model = shutil.copytree(TINY_WAN_PATH, tmp_path / "pickled")
    for path in (model / "transformer").glob("diffusion_pytorch_model*"):
        path.unlink()
    _pickled_weights(model / "transformer", marker)
    result = run_main("--config", TINY_CONFIG, "--output", "out.mp4", "--model", model, cwd=workdir)
    assert result.returncode == 2, result.explain()
    assert "Traceback" not in result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith("generate.py: error:") and "transformer" in line and ".safetensors" in line
    assert not marker.exists()
    assert list(workdir.iterdir()) == []


SOURCES = sorted((ROOT / "ds_dualparal").rglob("*.py")) + sorted((ROOT / "launch").rglob("*.py"))


def test_no_code_is_loaded_from_a_model_folder_and_no_pickle_is_read():
    assert len(SOURCES) > 10
    for path in SOURCES:
        text = path.read_text()
        assert "trust_remote_code" not in text, path
        assert not re.search(r"^\s*(import pickle|from pickle|import dill|import joblib)", text, re.MULTILINE), path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path}: {call}"
        assert not re.search(r"\bnp\.load\([^)]*allow_pickle=True", text), path
