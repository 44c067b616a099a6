"""The quality metrics (ds_dualparal/toy/quality.py) on synthetic toy videos with and without a planted defect,
block_boundaries by hand, and a tiny sweep of the benchmark runner (launch/quality.py) on the embedded model."""

from __future__ import annotations

import colorsys
import json

import numpy as np
import pytest
from conftest import launch_script

from ds_dualparal.toy import quality
from ds_dualparal.toy.toyvideo import (
    BACKGROUND_MAX_SATURATION,
    COLOURS,
    OBJECT_MIN_SATURATION,
)

SIZE = 64
FRAMES = 81  # 21 latent frames
BLOCK, CONTEXT = 4, 0  # 5 blocks: latent [0, 5), [5, 9), [9, 13), [13, 17), [17, 21)
BOUNDARIES = [17, 33, 49, 65]
FPS = 8


def block_of(frame: int) -> int:
    """The latent block of a video frame, for the defects below."""
    return sum(frame >= b for b in BOUNDARIES)


def toy_video(colour="red", shape="circle", frames=FRAMES, speed=0.5, x0=12.0, radius=6.0, jump=0.0,
              brightness_jump=0, texture_jump=0, tint=(0, 0, 0), hidden=(), extra=None, seed=0):
    """A `colour` `shape` moving right at `speed` px/frame over muted stripes, with ±3 levels of noise.

    Defects: per block index b of the frame, the object sits `jump`·b px further right, the whole frame is
    `brightness_jump`·(b % 2) levels brighter, the stripes are shifted `texture_jump`·b px; the background
    drifts linearly to `tint` (RGB levels added by the last frame); frames in `hidden` have no object;
    `extra` (colour, radius, x) adds a second, still disc.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    light, dark = np.array([150, 140, 125]), np.array([105, 100, 92])  # saturation <= 0.17
    video = np.empty((frames, SIZE, SIZE, 3), np.uint8)
    for f in range(frames):
        b = block_of(f)
        stripes = ((xx + texture_jump * b) // 4) % 2 == 0
        frame = np.where(stripes[..., None], light, dark).astype(np.float64)
        frame += np.asarray(tint) * f / (frames - 1)
        if f not in hidden:
            cx, cy = x0 + speed * f + jump * b, SIZE / 2
            if shape == "circle":
                inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2
            elif shape == "square":
                inside = (np.abs(xx - cx) <= radius) & (np.abs(yy - cy) <= radius)
            else:
                raise ValueError(shape)
            frame[inside] = COLOURS[colour]
        if extra is not None:
            other, r, x = extra
            frame[(xx - x) ** 2 + (yy - SIZE / 2) ** 2 <= r**2] = COLOURS[other]
        frame += brightness_jump * (b % 2)
        frame += rng.integers(-3, 4, size=frame.shape)
        video[f] = np.clip(np.round(frame), 0, 255)
    return video


# --- block boundaries ------------------------------------------------------------------------------------


@pytest.mark.parametrize("frames, block, context, want", [
    (21, 2, 0, [5, 13]),  # 6 latents: [0,2) [2,4) [4,6) -> latent 2 = video 5, latent 4 = video 13
    (21, 2, 1, [13]),  # K = (6-1)//2 = 2: block 0 = [0,4), block 1 = [4,6)
    (29, 4, 0, [13]),  # 8 latents: [0,4) [4,8); 4*1*4-3 = 13
    (161, 8, 0, [33, 65, 97, 129]),  # 41 latents: block 0 = 9 frames (the rest), then 8 each
    (161, 4, 2, [33, 49, 65, 81, 97, 113, 129, 145]),  # K = 39//4 = 9: block 0 = 9 frames
    (9, 1, 0, [1, 5]),  # 3 latents, one each: latent 1 = video 1..4, latent 2 = video 5..8
    (17, 8, 0, []),  # 5 latents, one block
    (1, 1, 0, []),
])
def test_block_boundaries_by_hand(frames, block, context, want):
    assert quality.block_boundaries(frames, block, context) == want


def test_block_boundaries_of_the_synthetic_videos():
    assert quality.block_boundaries(FRAMES, BLOCK, CONTEXT) == BOUNDARIES


@pytest.mark.parametrize("frames", [0, 20, 22])
def test_block_boundaries_need_4k_plus_1_frames(frames):
    with pytest.raises(ValueError, match="4k\\+1"):
        quality.block_boundaries(frames, 2, 0)


def test_latent_transitions():
    assert quality.latent_transitions(21) == [5, 9, 13, 17]
    assert quality.latent_transitions(5) == []


# --- colours ---------------------------------------------------------------------------------------------


def test_hsv_agrees_with_colorsys():
    rgb = np.random.default_rng(1).integers(0, 256, size=(1, 20, 20, 3), dtype=np.uint8)
    hue, saturation, value = quality.hsv(rgb)
    for (y, x) in [(i, j) for i in range(20) for j in range(20)]:
        h, s, v = colorsys.rgb_to_hsv(*(rgb[0, y, x] / 255.0))
        assert saturation[0, y, x] == pytest.approx(s, abs=1e-5)
        assert value[0, y, x] == pytest.approx(v, abs=1e-5)
        if s > 0:
            assert min(abs(hue[0, y, x] - 360 * h), 360 - abs(hue[0, y, x] - 360 * h)) < 1e-3


def test_only_saturated_bright_pixels_are_object_pixels():
    threshold = quality.SATURATION_THRESHOLD
    assert BACKGROUND_MAX_SATURATION < threshold < OBJECT_MIN_SATURATION
    pixels = np.array([[[
        (200, 150, 150),  # saturation 0.25: the background's maximum
        (200, 100, 100),  # 0.5: above the threshold, red
        (40, 10, 10),  # saturated but nearly black
        *COLOURS.values(),
    ]]], np.uint8)
    labels = quality.colour_labels(pixels)[0, 0]
    assert labels[0] == -1 and labels[2] == -1
    assert quality.COLOUR_NAMES[labels[1]] == "red"
    assert [quality.COLOUR_NAMES[k] for k in labels[3:]] == list(COLOURS)


# --- adherence -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("colour", list(COLOURS))
def test_each_palette_colour_adheres_to_its_own_name_only(colour):
    video = toy_video(colour, frames=9)
    for name in COLOURS:
        assert quality.adherence(video, name)["adherence"] == (1.0 if name == colour else 0.0), name


def test_adherence_without_the_object_is_zero():
    video = toy_video(hidden=range(FRAMES))
    assert quality.adherence(video, "red")["adherence"] == 0.0
    assert quality.score_video(video, "red", BOUNDARIES, FPS)["dominant_colour"] is None


def test_adherence_counts_the_frames_that_show_the_object():
    video = toy_video(hidden=range(0, FRAMES, 2))  # 41 of 81 frames hidden
    assert quality.adherence(video, "red")["adherence"] == pytest.approx(40 / 81)


def test_the_wrong_colour_does_not_adhere():
    scores = quality.score_video(toy_video("blue"), "red", BOUNDARIES, FPS)
    assert scores["adherence"] == 0.0 and scores["dominant_colour"] == "blue"
    assert scores["motion_jump_ratio"] is None  # no red object to follow


def test_a_smaller_object_of_the_named_colour_does_not_dominate():
    video = toy_video("red", frames=9, radius=4, extra=("blue", 9, 48))
    assert quality.adherence(video, "red")["adherence"] == 0.0
    assert quality.adherence(video, "blue")["adherence"] == 1.0


def test_scattered_pixels_or_a_huge_area_are_no_object():
    video = toy_video("red", frames=9, hidden=range(9))
    rng = np.random.default_rng(2)
    scattered = video.copy()
    for f in range(9):  # as many red pixels as a disc of radius 6, strewn over the frame
        ys, xs = rng.integers(0, SIZE, 113), rng.integers(0, SIZE, 113)
        scattered[f, ys, xs] = COLOURS["red"]
    assert quality.adherence(scattered, "red")["adherence"] == 0.0
    huge = video.copy()
    huge[:, :, : SIZE // 2 + 8] = COLOURS["red"]  # 62% of the frame
    assert quality.adherence(huge, "red")["adherence"] == 0.0


def test_fill_ratio_tells_a_circle_from_an_upright_square():
    circle = quality.adherence(toy_video(shape="circle", frames=9, radius=8), "red", "circle")
    square = quality.adherence(toy_video(shape="square", frames=9, radius=8), "red", "square")
    # a rasterised disc of radius 8 fills 197 of its 17 x 17 box's pixels: a bit under pi / 4
    assert circle["fill_ratio"] == pytest.approx(np.pi / 4, abs=0.06)
    assert square["fill_ratio"] == pytest.approx(1.0, abs=0.02)
    assert circle["shape_match"] == 1.0 and square["shape_match"] == 1.0
    assert quality.adherence(toy_video(shape="circle", frames=9, radius=8), "red", "square")["shape_match"] == 0.0


# --- seams -----------------------------------------------------------------------------------------------


def test_a_clean_video_has_no_seam():
    video = toy_video()
    assert 0.85 < quality.seam_ratio(video, BOUNDARIES) < 1.15
    assert 0.85 < quality.seam_ratio(video, BOUNDARIES, pairs="all") < 1.15


@pytest.mark.parametrize("defect", [dict(brightness_jump=10), dict(texture_jump=2)])
def test_a_jump_at_the_block_boundaries_is_a_seam(defect):
    video = toy_video(**defect)
    assert quality.seam_ratio(video, BOUNDARIES) > 2.0
    assert quality.seam_ratio(video, BOUNDARIES, pairs="all") > 2.0


def test_a_seam_is_found_at_its_own_boundaries_only():
    video = toy_video(brightness_jump=10)
    elsewhere = [i for i in quality.latent_transitions(FRAMES) if i not in BOUNDARIES]  # mid-block transitions
    assert quality.seam_ratio(video, elsewhere) < 1.0  # the real seams are now among the pairs compared with
    assert quality.seam_ratio(video, BOUNDARIES) > 2.0


def test_seam_ratio_needs_boundaries_and_pairs_to_compare():
    video = toy_video(frames=21)
    assert quality.seam_ratio(video, []) is None
    assert quality.seam_ratio(video, [5, 9, 13, 17]) is None  # every latent transition is a boundary
    with pytest.raises(ValueError):
        quality.seam_ratio(video, [21])


# --- motion ----------------------------------------------------------------------------------------------


def test_smooth_motion_has_no_jump():
    video = toy_video(speed=0.4, x0=8)
    assert 0.7 < quality.motion_jump_ratio(video, "red", BOUNDARIES) < 1.3
    assert 0.7 < quality.motion_jump_ratio(video, "red", BOUNDARIES, pairs="all") < 1.3


def test_a_centroid_jump_at_the_block_boundaries_is_found():
    video = toy_video(speed=0.4, x0=8, jump=4)
    assert quality.motion_jump_ratio(video, "red", BOUNDARIES) > 3.0
    assert quality.motion_jump_ratio(video, "red", BOUNDARIES, pairs="all") > 3.0
    assert quality.seam_ratio(video, BOUNDARIES) > 1.0  # the jump changes pixels too, less visibly


def test_a_still_object_reads_one():
    video = toy_video(speed=0.0)
    assert quality.motion_jump_ratio(video, "red", BOUNDARIES) == pytest.approx(1.0, abs=0.05)


def test_frames_without_the_object_are_skipped():
    jumpy = toy_video(speed=0.4, x0=8, jump=4, hidden=[3, 10, 40, 41])
    assert quality.motion_jump_ratio(jumpy, "red", BOUNDARIES) > 3.0
    hidden_at_boundaries = toy_video(speed=0.4, x0=8, jump=4, hidden=BOUNDARIES)
    assert quality.motion_jump_ratio(hidden_at_boundaries, "red", BOUNDARIES) is None


# --- drift -----------------------------------------------------------------------------------------------


def test_colour_drift_is_found_and_grows_with_the_drift():
    clean = quality.drift(toy_video(), FPS)
    small = quality.drift(toy_video(tint=(10, 5, -5)), FPS)
    large = quality.drift(toy_video(tint=(60, 30, -30)), FPS)
    assert clean < 0.1
    assert large > 0.5
    assert clean < small < large


def test_the_colour_histogram_is_soft():
    grey = np.full((1, 2, 2, 3), 0, np.uint8)
    assert quality.colour_histogram(grey).argmax() == 0 and quality.colour_histogram(grey).max() == 1.0
    between = np.full((1, 2, 2, 3), 255 // 14, np.uint8)  # halfway between the first two centres (8 bins)
    histogram = quality.colour_histogram(between).reshape(8, 8, 8)
    assert histogram.sum() == pytest.approx(1.0)
    assert histogram[:2, :2, :2] == pytest.approx(np.full((2, 2, 2), 1 / 8), abs=0.01)


def test_drift_of_a_short_video_compares_its_halves():
    video = toy_video(frames=9, tint=(80, 0, 0))
    assert quality.drift(video, fps=16) == pytest.approx(quality.drift(video, fps=4))
    assert quality.drift(video, fps=16) > 0.5


# --- one video -------------------------------------------------------------------------------------------


def test_score_video_has_every_metric():
    scores = quality.score_video(toy_video(), "red", BOUNDARIES, FPS, "circle")
    assert scores["adherence"] == 1.0 and scores["object_frames"] == FRAMES and scores["dominant_colour"] == "red"
    for key in ("seam_ratio", "seam_ratio_all_pairs", "motion_jump_ratio", "motion_jump_ratio_all_pairs"):
        assert 0.7 < scores[key] < 1.3, key
    assert scores["drift"] < 0.1 and scores["shape_match"] == 1.0
    with pytest.raises(ValueError, match="uint8"):
        quality.score_video(toy_video().astype(np.float32), "red", BOUNDARIES, FPS)
    with pytest.raises(ValueError, match="colour"):
        quality.score_video(toy_video(), "orange", BOUNDARIES, FPS)


# --- background, motion, along the video -----------------------------------------------------------------


def rendered(specs, frames=17):
    """Toy clips of `specs` as uint8 (F, H, W, 3) videos, as toyvideo renders them for training."""
    import torch

    from ds_dualparal.toy import toyvideo

    video = toyvideo.render_batch(specs, frames, SIZE, SIZE, "cpu")
    return [((v.permute(0, 2, 3, 1).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy() for v in video]


def test_background_texture_names_the_rendered_texture_and_motion_the_rendered_motion():
    import torch

    from ds_dualparal.toy import toyvideo

    specs = []
    for i, background in enumerate(toyvideo.BACKGROUNDS):
        for j, motion in enumerate(toyvideo.MOTIONS):
            specs += toyvideo.sample_specs(3, torch.Generator().manual_seed(10 * i + j), background=background,
                                           motion=motion)
    videos = rendered(specs)
    textures = [quality.background_texture(v) for v in videos]
    motions = [quality.object_motion(quality.track_object(v, s.colour)) for s, v in zip(specs, videos)]
    assert textures == [s.background for s in specs]
    assert motions == [s.motion for s in specs]


def test_a_flat_or_blurred_away_background_is_not_a_pattern():
    flat = np.full((5, SIZE, SIZE, 3), 120, np.uint8)
    assert quality.background_texture(flat) == "cloudy"  # no pattern: nothing periodic
    stripes = toy_video(frames=9)  # stripes 4 px wide, the object moving over them
    assert quality.background_texture(stripes) == "striped"


def test_wavy_stripes_read_striped_and_a_grid_does_not():
    """Stripes whose orientation wanders (as the trained model draws them) spread over a fan of angles:
    here two gratings 30 degrees apart, neither holding STRIPE_CONCENTRATION within STRIPE_ANGLE. Still
    striped, since nothing lies across them; two gratings 90 degrees apart are a grid."""
    from unittest import mock

    y, x = np.mgrid[0:64, 0:64] / 64.0

    def video(*degrees):
        waves = sum(np.sin(2 * np.pi * 5 * (x * np.cos(np.radians(d)) + y * np.sin(np.radians(d)))) for d in degrees)
        grey = np.where(waves > 0, 170, 90).astype(np.uint8)
        return np.repeat(np.repeat(grey[None, :, :, None], 3, axis=3), 4, axis=0)

    assert quality.background_texture(video(0, 30)) == "striped"
    with mock.patch.object(quality, "ACROSS_SHARE", -1.0):  # the narrow rule alone calls it a grid
        assert quality.background_texture(video(0, 30)) != "striped"
    assert quality.background_texture(video(0, 90)) in ("checkered", "dotted")


def test_seconds_windows():
    assert quality.seconds_windows(161, 8) == {"first": slice(0, 8), "middle": slice(76, 84),
                                               "last": slice(153, 161)}
    assert quality.seconds_windows(21, 8) == {"first": slice(0, 7), "middle": slice(7, 14), "last": slice(14, 21)}
    with pytest.raises(ValueError, match="fps"):
        quality.seconds_windows(21, 0)


def test_along_the_video_finds_where_the_object_is_lost():
    video = toy_video(hidden=range(60, FRAMES))  # the object vanishes for the last 21 frames
    along = quality.along_video(video, "red", FPS, "circle", "moves sideways", "striped")
    assert along["adherence_first"] == along["adherence_middle"] == 1.0 and along["adherence_last"] == 0.0
    assert along["motion_first"] == 1.0 and along["motion_last"] is None
    assert along["background_first"] == along["background_last"] == 1.0 and along["shape_first"] == 1.0
    scores = quality.score_video(video, "red", BOUNDARIES, FPS, "circle", "moves up and down", "dotted")
    assert scores["motion_match"] == 0.0 and scores["object_motion"] == "moves sideways"
    assert scores["background_match"] == 0.0 and scores["background_texture"] == "striped"


# --- the runner ------------------------------------------------------------------------------------------


def runner():
    return launch_script("quality.py")


METRIC_KEYS = ("adherence", "fill_ratio", "shape_match", "object_frames", "dominant_colour", "seam_ratio",
               "seam_ratio_all_pairs", "motion_jump_ratio", "motion_jump_ratio_all_pairs", "drift")


def test_a_tiny_sweep_writes_every_metric_for_every_row(tmp_path, capsys):
    out = tmp_path / "q" / "quality.json"
    assert runner().main(["--prompts", "1", "--seeds", "3", "--settings", "2:1", "--noise", "coordinated",
                          "--frames", "21", "--steps", "2", "--out", str(out)]) == 0
    document = json.loads(out.read_text())
    rows = document["videos"]
    assert [r["row"] for r in rows] == ["DualParal B=2 c=1 coordinated", "baseline (at B=2 c=1's boundaries)"]
    for row in rows:
        for key in METRIC_KEYS:
            assert key in row, (row["row"], key)
        assert 0.0 <= row["adherence"] <= 1.0 and 0.0 <= row["drift"] <= 1.0
        assert row["seam_ratio"] > 0 and row["seconds"] > 0 and row["frames"] == 21 and row["seed"] == 3
        assert row["boundaries"] == [13] and row["colour"] == "red"
    # the two videos differ (blocks with context vs one block), their scores follow from their frames
    assert rows[0]["seam_ratio"] != rows[1]["seam_ratio"]
    assert [e["row"] for e in document["summary"]] == [r["row"] for r in rows]
    table = capsys.readouterr().out
    assert "| DualParal B=2 c=1 coordinated | 1 |" in table and "| baseline" in table
    assert not list(out.parent.glob(".*partial"))


@pytest.mark.parametrize("flags", [
    ["--settings", "2:3"], ["--settings", "2"], ["--frames", "20"], ["--seeds", "a"], ["--prompts", "9"],
    ["--noise", "fresh"], ["--baseline-frames", "22"], ["--steps", "0"], ["--model", "/nonexistent/model"],
])
def test_bad_flags_exit_2(flags, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit:
        runner().parse_args(flags + ["--out", str(tmp_path / "q.json")])
    assert exit.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("launch/quality.py: error:")


def test_the_sweep_plan(tmp_path):
    out = ["--out", str(tmp_path / "q.json")]
    args = runner().parse_args(["--frames", "33", "--baseline-frames", "9", "--seeds", "0,5"] + out)
    jobs = args.jobs
    # 3 prompts x 2 seeds x (4 settings x 2 noise modes + the baseline)
    assert len(jobs) == 3 * 2 * 9 and args.steps == 20 and args.fps == 8
    baseline = [j for j in jobs if j.method == "baseline"]
    assert len(baseline) == 6 and all(j.cfg.num_frames == 9 and j.cfg.block_size == 3 for j in baseline)
    assert {(j.cfg.block_size, j.cfg.context, j.cfg.noise) for j in jobs if j.method == "dualparal"} == {
        (b, c, n) for b, c in ((2, 1), (4, 0), (4, 2), (8, 4)) for n in ("coordinated", "independent")}
    assert {j.cfg.seed for j in jobs} == {0, 5} and all(j.cfg.num_frames == 33 for j in jobs if j.method != "baseline")
    assert len({j.cfg.prompt for j in jobs}) == 3
    none = runner().parse_args(["--baseline-frames", "0", "--prompts", "1", "--seeds", "0"] + out)
    assert [j.method for j in none.jobs] == ["dualparal"] * 8


def test_the_summary_gives_standard_errors_and_seam_separations():
    module = runner()

    def row(name, context, seam):
        return {"row": name, "block_size": 4, "context": context, "noise": "coordinated", "seam_ratio": seam,
                "seconds": 1.0}

    rows = [row("no context", 0, v) for v in (2.0, 2.2, 2.4)] + [row("context", 2, v) for v in (1.0, 1.1, 1.2)]
    table = module.summary(rows)
    assert [e["row"] for e in table] == ["no context", "context"]
    assert table[0]["seam_ratio"] == pytest.approx(2.2) and table[0]["seam_ratio_se"] == pytest.approx(0.2 / 3**0.5)
    assert table[0]["adherence"] is None and table[0]["adherence_se"] is None
    (separation,) = module.seam_separations(table)
    z = (2.2 - 1.1) / ((0.2**2 + 0.1**2) / 3) ** 0.5
    assert separation == {"without": "no context", "with": "context", "seam_ratio_z": pytest.approx(z)}
    assert "±0.12" in module.markdown(table) and "standard errors apart" in module.markdown(table)
