"""The run config: shipped files load, every user mistake is one ConfigError line naming the field."""

import json
from pathlib import Path

import pydantic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ds_dualparal.config import (
    ATTENTION_BACKENDS,
    FLAGS,
    LATENTS_FIELDS,
    MODEL_FIELDS,
    NOISE_MODES,
    SCHEDULERS,
    ConfigError,
    DualParalConfig,
    RunConfig,
    config_from_dict,
    load_config,
)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "ds_configs"
SHIPPED = sorted(CONFIG_DIR.glob("*.json"))


def write_json(tmp_path, data, name="ds_config.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def error_of(section=None, overrides=None, **top):
    data = {**top, "dualparal": section or {}}
    with pytest.raises(ConfigError) as info:
        config_from_dict(data, overrides=overrides)
    return str(info.value)


def test_every_shipped_config_is_listed_and_loads():
    names = {p.name for p in SHIPPED}
    assert names == {
        "tiny.json",
        "tiny-long.json",
        "wan2.1-t2v-1.3b-480p.json",
        "wan2.1-t2v-14b-720p.json",
        "wan2.2-t2v-a14b-720p.json",
        "anchor-1.3b-480p.json",
        "wan2.1-t2v-1.3b-480p-storyline.json",
        "wan2.1-i2v-14b-480p.json",
        "wan2.2-ti2v-5b-720p.json",
    }
    for path in SHIPPED:
        run = load_config(path)
        assert run.source == str(path)


def test_tiny_config_is_the_cpu_demo():
    cfg = load_config(CONFIG_DIR / "tiny.json").dualparal
    assert cfg.model is None
    assert (cfg.height, cfg.width, cfg.num_frames, cfg.latent_frames) == (64, 64, 21, 6)
    assert (cfg.num_inference_steps, cfg.block_size, cfg.context) == (20, 2, 1)
    assert (cfg.dtype, cfg.guidance_scale, cfg.seed, cfg.fps) == ("float32", 4.0, 0, 8)
    assert cfg.output == "outputs/tiny.mp4"


def test_tiny_long_config_is_the_tiny_demo_at_641_frames():
    tiny = load_config(CONFIG_DIR / "tiny.json").dualparal
    long = load_config(CONFIG_DIR / "tiny-long.json").dualparal
    assert (long.num_frames, long.latent_frames, long.output) == (641, 161, "outputs/tiny-long.mp4")
    assert long.with_overrides(num_frames=21, output=tiny.output) == tiny


def test_anchor_config_matches_design():
    cfg = load_config(CONFIG_DIR / "anchor-1.3b-480p.json").dualparal
    assert cfg.model == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"  # not the tiny model at 480x832
    assert (cfg.height, cfg.width, cfg.latent_frames, cfg.num_inference_steps) == (480, 832, 48, 10)
    assert (cfg.block_size, cfg.context, cfg.dtype) == (8, 8, "bfloat16")
    assert cfg.do_classifier_free_guidance


@pytest.mark.parametrize(
    "name, model, shape, steps, guidance, flow_shift",
    [
        ("wan2.1-t2v-1.3b-480p", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", (480, 832, 189), 50, (5.0, 5.0), 3.0),
        ("wan2.1-t2v-14b-720p", "Wan-AI/Wan2.1-T2V-14B-Diffusers", (720, 1280, 321), 50, (5.0, 5.0), 5.0),
        ("wan2.2-t2v-a14b-720p", "Wan-AI/Wan2.2-T2V-A14B-Diffusers", (720, 1280, 321), 40, (4.0, 3.0), 12.0),
    ],
)
def test_model_configs(name, model, shape, steps, guidance, flow_shift):
    cfg = load_config(CONFIG_DIR / f"{name}.json").dualparal
    assert cfg.model == model
    assert (cfg.height, cfg.width, cfg.num_frames) == shape
    assert cfg.num_inference_steps == steps
    assert (cfg.guidance_scale, cfg.low_noise_guidance_scale) == guidance
    assert cfg.flow_shift == flow_shift
    assert (cfg.block_size, cfg.context, cfg.dtype) == (8, 8, "bfloat16")


def test_defaults():
    run = load_config(None)
    assert run == RunConfig(dualparal=DualParalConfig(), source=None)
    cfg = run.dualparal
    assert cfg.model is None
    assert cfg.prompt == "A cat walks on the grass, realistic style."
    assert (cfg.height, cfg.width, cfg.num_frames, cfg.latent_frames) == (480, 832, 81, 21)
    assert (cfg.num_inference_steps, cfg.guidance_scale, cfg.guidance_scale_2) == (50, 5.0, None)
    assert (cfg.scheduler, cfg.flow_shift, cfg.block_size, cfg.context) == ("unipc", 3.0, 8, 8)
    assert (cfg.noise, cfg.dtype, cfg.seed) == ("coordinated", "bfloat16", 0)
    assert (cfg.partition_method, cfg.pipeline_stages, cfg.attention_backend) == ("type:WanBlockLayer", None, None)
    assert (cfg.comm_timeout_s, cfg.output, cfg.save_latents, cfg.fps) == (600, "outputs/video.mp4", None, 16)
    assert cfg.low_noise_guidance_scale == 5.0


def test_every_field_is_documented():
    for name, info in DualParalConfig.model_fields.items():
        assert info.description, name


def test_every_field_is_classified():
    """A new field must say, through setting(...), whether it is model- or job-level and changes the latents."""
    for name, info in DualParalConfig.model_fields.items():
        tags = info.json_schema_extra
        assert isinstance(tags, dict), f"{name}: declare it with setting(...)"
        assert tags["scope"] in ("model", "job"), name
        assert type(tags["latents"]) is bool, name
        assert tags["flag"] is None or tags["flag"].isidentifier(), name
        assert isinstance(tags["flag_options"], dict), name


def test_the_tags_keep_the_tables_they_replaced():
    """The hand-written tables before the tags (cli.FLAGS, jobs.MODEL_FIELDS, checkpoint.OUTPUT_FIELDS + model);
    fields added since may only add to them."""
    old_fields = {
        "model", "prompt", "negative_prompt", "height", "width", "num_frames", "num_inference_steps", "guidance_scale",
        "guidance_scale_2", "scheduler", "flow_shift", "block_size", "context", "noise", "dtype", "seed",
        "partition_method", "pipeline_stages", "attention_backend", "comm_timeout_s", "output", "save_latents", "fps",
    }
    assert set(MODEL_FIELDS) & old_fields == {
        "model", "dtype", "partition_method", "pipeline_stages", "attention_backend", "comm_timeout_s"}
    not_latents = {"partition_method", "pipeline_stages", "comm_timeout_s", "output", "save_latents", "fps"}
    assert set(LATENTS_FIELDS) & old_fields == old_fields - not_latents
    assert {flag: field for flag, field in FLAGS.items() if field in old_fields} == {
        "model": "model", "prompt": "prompt", "negative_prompt": "negative_prompt", "height": "height", "width": "width",
        "frames": "num_frames", "steps": "num_inference_steps", "guidance": "guidance_scale", "scheduler": "scheduler",
        "flow_shift": "flow_shift", "block_size": "block_size", "context": "context", "noise": "noise",
        "dtype": "dtype", "seed": "seed", "stages": "pipeline_stages", "attention_backend": "attention_backend",
        "output": "output", "save_latents": "save_latents", "fps": "fps",
    }
    assert (SCHEDULERS, NOISE_MODES) == (("unipc", "euler"), ("coordinated", "independent"))


def test_other_top_level_keys_are_accepted_and_ignored():
    ds = {"steps_per_print": 7, "comms_logger": {"enabled": True, "verbose": False}, "wall_clock_breakdown": True}
    run = config_from_dict({**ds, "dualparal": {"seed": 3}}, source="x.json")
    assert run == RunConfig(dualparal=DualParalConfig(seed=3), source="x.json")
    assert run.source == "x.json"


def test_missing_section_means_defaults():
    assert config_from_dict({"steps_per_print": 1}).dualparal == DualParalConfig()


@pytest.mark.parametrize("frames, latents", [(1, 1), (5, 2), (81, 21), (189, 48), (1001, 251)])
def test_latent_frames(frames, latents):
    assert DualParalConfig(num_frames=frames).latent_frames == latents


@pytest.mark.parametrize(
    "section, expected",
    [
        ({"height": 470}, "dualparal.height: 470 is not a multiple of 16; nearest valid: 464 or 480"),
        ({"width": 840}, "dualparal.width: 840 is not a multiple of 16; nearest valid: 832 or 848"),
        ({"width": 8}, "dualparal.width: 8 is not a multiple of 16; nearest valid: 16"),
        ({"height": 0}, "dualparal.height: 0 must be > 0"),
        ({"height": "480"}, 'dualparal.height: "480" is not an integer'),
        ({"height": True}, "dualparal.height: true is not an integer"),
        ({"height": 480.5}, "dualparal.height: 480.5 is not an integer"),
        ({"num_frames": 80}, "dualparal.num_frames: 80 is not 4k+1; nearest valid: 77 or 81"),
        ({"num_frames": 2}, "dualparal.num_frames: 2 is not 4k+1; nearest valid: 1 or 5"),
        ({"num_frames": 0}, "dualparal.num_frames: 0 must be >= 1"),
        ({"num_inference_steps": 0}, "dualparal.num_inference_steps: 0 must be >= 1"),
        ({"context": 9}, "dualparal.context: 9 must be <= block_size (8)"),
        ({"block_size": 2, "context": 3}, "dualparal.context: 3 must be <= block_size (2)"),
        ({"context": -1}, "dualparal.context: -1 must be >= 0"),
        ({"block_size": 0}, "dualparal.block_size: 0 must be >= 1"),
        ({"seed": -1}, "dualparal.seed: -1 must be >= 0"),
        ({"guidance_scale": -0.5}, "dualparal.guidance_scale: -0.5 must be >= 0"),
        ({"guidance_scale": float("nan")}, "dualparal.guidance_scale: nan must be a finite number"),
        ({"guidance_scale_2": "high"}, 'dualparal.guidance_scale_2: "high" is not a number or null'),
        ({"flow_shift": 0}, "dualparal.flow_shift: 0 must be > 0"),
        ({"pipeline_stages": 0}, "dualparal.pipeline_stages: 0 must be >= 1"),
        ({"comm_timeout_s": 0}, "dualparal.comm_timeout_s: 0 must be > 0"),
        ({"fps": -16}, "dualparal.fps: -16 must be > 0"),
        ({"model": ""}, "dualparal.model: must not be empty (or null)"),
        ({"prompt": 3}, "dualparal.prompt: 3 is not a string"),
        ({"scheduler": "ddim"}, "dualparal.scheduler: \"ddim\" is not allowed; expected 'unipc' or 'euler'"),
        ({"noise": "pink"}, "dualparal.noise: \"pink\" is not allowed; expected 'coordinated' or 'independent'"),
        (
            {"dtype": "fp8"},
            "dualparal.dtype: \"fp8\" is not allowed; expected 'float32', 'bfloat16' or 'float16'",
        ),
        (
            {"partition_method": "greedy"},
            "dualparal.partition_method: \"greedy\" is not one of 'uniform', 'type:<regex>'",
        ),
        (
            {"partition_method": "type:("},
            'dualparal.partition_method: "type:(": invalid regex',
        ),
        (
            {"partition_method": "type:a:b"},
            "dualparal.partition_method: \"type:a:b\": the regex after 'type:' must be non-empty and contain no ':'",
        ),
    ],
)
def test_invalid_field_gives_one_line_naming_it(section, expected):
    message = error_of(section)
    assert message.startswith(expected)
    assert "\n" not in message


def test_parameters_partition_is_rejected_with_the_reason():
    message = error_of({"partition_method": "parameters"})
    assert message.startswith("dualparal.partition_method: 'parameters' is not supported")
    assert "every layer on every rank" in message
    assert "'uniform' or 'type:<regex>'" in message


@pytest.mark.parametrize("method", ["uniform", "UNIFORM", "type:WanBlockLayer", "type:wan.*layer"])
def test_accepted_partition_methods(method):
    assert DualParalConfig(partition_method=method).partition_method == method


def test_attention_backend_lists_allowed_values():
    for backend in ATTENTION_BACKENDS:
        assert DualParalConfig(attention_backend=backend).attention_backend == backend
    message = error_of({"attention_backend": "flex"})
    assert message.startswith('dualparal.attention_backend: "flex" is not allowed; expected ')
    assert "'_native_cudnn'" in message and "'flash'" in message


def test_unknown_key_names_it_and_lists_fields():
    message = error_of({"num_steps": 10})
    assert message.startswith("dualparal.num_steps: unknown field; allowed fields: model, prompt,")
    assert "num_inference_steps" in message


def test_invalid_json_names_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "dualparal": {\n    "seed": 1,\n  }\n}\n')
    with pytest.raises(ConfigError, match=r"^.*bad\.json: invalid JSON at line 4, column 3: "):
        load_config(path)


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"dualparal": {"seed": 1, "seed": 2}}', "duplicate key 'seed'"),
        ('{"dualparal": {"guidance_scale": NaN}}', "NaN is not valid JSON"),
    ],
)
def test_json_that_python_would_accept_silently_is_rejected(tmp_path, text, expected):
    path = tmp_path / "c.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected):
        load_config(path)


@pytest.mark.parametrize(
    "data, expected",
    [
        ([1, 2], "the top level must be a JSON object, got an array"),
        ("dualparal", "the top level must be a JSON object, got a string"),
        (None, "the top level must be a JSON object, got null"),
        ({"dualparal": [1]}, "dualparal: must be a JSON object, got an array"),
        ({"dualparal": None}, "dualparal: must be a JSON object, got null"),
    ],
)
def test_wrong_shapes(tmp_path, data, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(write_json(tmp_path, data))


def test_missing_file(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(ConfigError, match=r"nope\.json: config file not found$"):
        load_config(path)


def test_unreadable_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path)
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00{")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(binary)


def test_overrides_apply_on_top_of_the_file_and_skip_none(tmp_path):
    path = write_json(tmp_path, {"steps_per_print": 5, "dualparal": {"seed": 1, "height": 64, "width": 64}})
    run = load_config(path, overrides={"seed": 7, "num_inference_steps": 3, "height": None})
    assert (run.dualparal.seed, run.dualparal.num_inference_steps, run.dualparal.height) == (7, 3, 64)


def test_overrides_are_validated_together_with_the_file(tmp_path):
    path = write_json(tmp_path, {"dualparal": {"block_size": 4, "context": 4}})
    with pytest.raises(ConfigError, match=r"^dualparal\.context: 4 must be <= block_size \(2\)$"):
        load_config(path, overrides={"block_size": 2})
    assert load_config(path, overrides={"block_size": 2, "context": 1}).dualparal.context == 1
    with pytest.raises(ConfigError, match=r"^dualparal\.height: 100 is not a multiple of 16"):
        load_config(None, overrides={"height": 100})
    with pytest.raises(ConfigError, match=r"^dualparal\.bogus: unknown field"):
        load_config(None, overrides={"bogus": 1})


def test_with_overrides_revalidates_and_keeps_the_original():
    cfg = DualParalConfig(block_size=4, context=2)
    changed = cfg.with_overrides(context=4, model="some/model")
    assert (changed.context, changed.model, changed.block_size) == (4, "some/model", 4)
    assert cfg.context == 2 and cfg.model is None
    assert changed.with_overrides(model=None).model is None
    with pytest.raises(ConfigError, match=r"^dualparal\.context: 5 must be <= block_size \(4\)$"):
        cfg.with_overrides(context=5)
    with pytest.raises(ConfigError, match=r"^dualparal\.scheduler: "):
        cfg.with_overrides(scheduler="dpm")


def test_config_is_frozen():
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        DualParalConfig().seed = 3


@pytest.mark.parametrize("world, stages, expected", [(4, None, (4, 1)), (6, 3, (3, 2)), (8, 1, (1, 8))])
def test_pipeline_topology(world, stages, expected):
    assert DualParalConfig(pipeline_stages=stages).pipeline_topology(world) == expected


def test_pipeline_stages_must_divide_world_size():
    with pytest.raises(ConfigError, match=r"^dualparal\.pipeline_stages: 4 does not divide the world size \(6\); allowed: 1, 2, 3, 6$"):
        DualParalConfig(pipeline_stages=4).pipeline_topology(6)


# ---- fuzz: any JSON value yields a RunConfig or a one-line ConfigError, never anything else ----

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**400)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
plausible_values = (
    json_values
    | st.integers(min_value=-20, max_value=2000)
    | st.sampled_from(
        ["unipc", "euler", "coordinated", "independent", "float32", "bfloat16", "float16", "uniform",
         "parameters", "type:WanBlockLayer", "type:(", "type:", "flash", "native", "outputs/x.mp4"]
    )
)
section_keys = st.sampled_from([*DualParalConfig.model_fields, "bogus", "Height", ""])
sections = st.dictionaries(section_keys, plausible_values, max_size=6)
configs = json_values | st.fixed_dictionaries(
    {"dualparal": sections}, optional={"steps_per_print": json_values, "comms_logger": json_values}
)


def _load_or_error(data, tmp_path):
    path = tmp_path / "fuzz.json"
    path.write_text(json.dumps(data))
    try:
        run = load_config(path)
    except ConfigError as exc:
        message = str(exc)
        assert message and "\n" not in message and "\r" not in message
        assert message.startswith(("dualparal", str(path)))
        return
    assert isinstance(run, RunConfig)
    assert run.dualparal.latent_frames >= 1
    assert run.dualparal.context <= run.dualparal.block_size


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=configs)
def test_fuzz_any_json_gives_config_or_config_error(data, tmp_path):
    _load_or_error(data, tmp_path)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(section=sections, overrides=st.dictionaries(section_keys, plausible_values, max_size=3))
def test_fuzz_overrides_give_config_or_config_error(section, overrides):
    try:
        run = config_from_dict({"dualparal": section}, overrides=overrides)
    except ConfigError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("dualparal")
        return
    assert isinstance(run.dualparal, DualParalConfig)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=40) | st.binary(max_size=40).map(lambda b: b.decode("latin-1")))
def test_fuzz_any_text_file_gives_config_or_config_error(text, tmp_path):
    path = tmp_path / "fuzz.json"
    path.write_text(text, encoding="utf-8")
    try:
        load_config(path)
    except ConfigError as exc:
        assert "\n" not in str(exc)
