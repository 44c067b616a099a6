"""Quality metrics for long videos of the toy world (`toyvideo.py`): does the video hold together across
DualParal's block boundaries, and does it show what the prompt asked for?

Pure numpy (no torch). A video is a uint8 array (F, H, W, 3), RGB. Four numbers per video:

- **adherence** (`adherence`), 0..1: the fraction of frames that show the prompt's colour as a plausible
  object. 1.0 = every frame does, 0 = none. An object pixel is a pixel whose HSV saturation is at least
  `SATURATION_THRESHOLD` (halfway between the toy world's background maximum and object minimum) and whose
  value is at least `MIN_VALUE` (near-black pixels have no reliable hue); it is given the palette colour
  (`toyvideo.COLOURS`) nearest in hue. A frame adheres when the pixels of the named colour (its *mask*)
  cover between `MIN_OBJECT_AREA` and `MAX_OBJECT_AREA` of the frame, are compact (at least
  `MIN_COMPACTNESS` of them lie within twice the radius of an equal-area disc around their centroid:
  one blob, not scattered noise) and are more than half of all object pixels (the named colour dominates).
  Auxiliary, not in the headline: `fill_ratio`, the mask's area over its bounding box's (circle ≈ 0.785,
  a bit less rasterised, 0.74 at radius 8 px; axis-aligned square 1; triangle ≈ 0.5; a square turned 45°
  also gives 0.5, so rotation blurs it), and `shape_match`, the fraction of adhering frames whose fill
  ratio is nearest the named shape's.
- **seam ratio** (`seam_ratio`), ≥ 0: the mean absolute change of the pixels (levels of 255) from the last
  frame of a block to the first frame of the next, over the mean change at the other latent-frame
  transitions inside blocks. 1.0 = the block boundaries change the picture no more than any other
  latent frame does (no seam); 2.0 = twice as much. Wan's causal VAE decodes four video
  frames from each latent frame, so a change between two latent frames can differ from one inside a
  latent frame for the VAE's own reasons; comparing boundaries with other latent transitions removes that.
  `seam_ratio_all_pairs` divides by the mean change over every pair of consecutive frames inside blocks
  instead (there the VAE's rhythm can move 1.0 a little).
- **motion-jump ratio** (`motion_jump_ratio`), ≥ 0: the object's centroid (of the adherence mask) moves
  this many times further across a block boundary than across the other latent transitions inside blocks.
  1.0 = motion is as smooth at boundaries as elsewhere; frames without a plausible object are skipped
  (a pair counts only if both of its frames have one). `motion_jump_ratio_all_pairs` as for seams.
- **drift** (`drift`), 0..1: the total-variation distance between the colour histograms (a joint RGB
  histogram of `DRIFT_BINS`³ soft bins over all pixels, `colour_histogram`) of the first second and the
  last second of the video. 0 = the same colours at the end as at the start; 1 = no colour in common
  (every colour moved by a bin spacing or more, ~36 levels of 255, or changed altogether).

Whether the other words of the prompt are followed, and adherence along the video:

- **background** (`background_texture`, `background_match`): the static background (per pixel the median
  over the frames, object pixels left out) is classified from its power spectrum as cloudy (energy below
  `CLOUDY_CYCLES` cycles a side), striped (the periodic energy along one orientation), dotted or
  checkered (a grid: the minority tone's share); 1.0 when it is the named one. Every rendered toy
  clip of `tests/test_quality.py` is classified right.
- **motion** (`object_motion`, `motion_match`): the tracked centroid's travel (5th to 95th percentile)
  along x and y: still ("turns"), along one axis, or both ("bounces").
- **along the video** (`along_video`): adherence, shape, motion and background in the first, middle and
  last second (`seconds_windows`), e.g. `adherence_first` and `adherence_last`: a model that loses the
  prompt's colour after a second reads 0.9 then 0.0.

Ratios add a small constant to both means (`SEAM_EPSILON` levels, `JUMP_EPSILON` pixels), so a perfectly
still video or object gives 1.0 rather than 0/0. A shape that turns in place has no motion to compare: its
motion-jump ratio divides the centroid's jitter by jitter and means little. A metric that cannot be
computed (no block boundary, no object in both frames of any pair, ...) is None.

Block boundaries follow the project's timeline (`timeline.BlockTimeline`): block 0 holds the frames left
over (so blocks 1… are whole), and latent frame k ≥ 1 decodes to video frames 4k−3 … 4k (`block_boundaries`).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

import numpy as np

from ..config import TEMPORAL_FACTOR
from ..pipeline.timeline import BlockTimeline
from .toyvideo import BACKGROUND_MAX_SATURATION, COLOURS, MOTIONS, OBJECT_MIN_SATURATION, SHAPES

SATURATION_THRESHOLD = (BACKGROUND_MAX_SATURATION + OBJECT_MIN_SATURATION) / 2
MIN_VALUE = 0.3  # HSV value below which a pixel's hue is noise (every palette colour has value >= 0.76)
MIN_OBJECT_AREA = 0.005  # of the frame: 20 pixels of 64x64
MAX_OBJECT_AREA = 0.25
MIN_COMPACTNESS = 0.8
DRIFT_BINS = 8  # per RGB channel: centres 36.4 levels apart
SEAM_EPSILON = 0.05  # levels of 255
JUMP_EPSILON = 0.05  # pixels
# Fill ratio (mask area / bounding-box area) of each shape drawn upright; a shape of toyvideo.SHAPES not
# listed here gets no shape_match.
SHAPE_FILL = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}

COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
# Background texture (`background_texture`): the toy textures repeat 3.8-7.1 times a frame side (stripes and
# dots; checkers' first harmonic lies further out), the cloudy waves 1-3 times.
CLOUDY_CYCLES = 3.4  # cycles per frame side below which spectral energy counts as cloudy
CLOUDY_SHARE = 0.5  # share of the background's spectral energy below CLOUDY_CYCLES that makes it cloudy
STRIPE_CONCENTRATION = 0.6  # share of the periodic energy within STRIPE_ANGLE of one orientation: stripes
STRIPE_ANGLE = 12.0  # degrees
# Wavy stripes spread their energy over a wider fan of angles, but a grid (checkers, dots) puts as much
# across it: STRIPE_CONCENTRATION within WAVY_ANGLE of one orientation and at most ACROSS_SHARE within
# WAVY_ANGLE of the orientation across it also reads striped.
WAVY_ANGLE = 30.0  # degrees
ACROSS_SHARE = 0.1
DOT_MINORITY = 0.38  # the minority tone covers less than this share of the background: dots (else checkers)
# Motion (`object_motion`): how far the object's centroid travels across a window, pixels (5th to 95th
# percentile of its coordinates) and the ratio of the shorter axis to the longer below which it moves along one.
STILL_TRAVEL = 3.0
ONE_AXIS_RATIO = 0.35


def _check_video(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"a video is a uint8 array (F, H, W, 3), got {frames.dtype} {frames.shape}")
    return frames


def hsv(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue in degrees [0, 360), saturation and value in [0, 1] of uint8 RGB pixels (float32 arrays)."""
    rgb = np.asarray(frames, dtype=np.float32) / 255.0
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    high = rgb.max(axis=-1)
    low = rgb.min(axis=-1)
    span = high - low
    saturation = np.where(high > 0, span / np.where(high > 0, high, 1), 0).astype(np.float32)
    safe = np.where(span > 0, span, 1)
    hue = np.where(high == r, ((g - b) / safe) % 6, np.where(high == g, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = np.where(span > 0, hue * 60.0, 0.0).astype(np.float32)
    return hue, saturation, high.astype(np.float32)


PALETTE_HUES = np.array([hsv(np.array([[rgb]], dtype=np.uint8))[0][0, 0] for rgb in COLOURS.values()], np.float32)


def colour_labels(frames: np.ndarray) -> np.ndarray:
    """Per pixel, the index in COLOUR_NAMES of the nearest palette hue for object pixels (saturation >=
    SATURATION_THRESHOLD and value >= MIN_VALUE), -1 for every other pixel. Shape (F, H, W), int8."""
    hue, saturation, value = hsv(_check_video(frames))
    distance = np.abs(hue[..., None] - PALETTE_HUES)
    distance = np.minimum(distance, 360.0 - distance)
    nearest = distance.argmin(axis=-1).astype(np.int8)
    return np.where((saturation >= SATURATION_THRESHOLD) & (value >= MIN_VALUE), nearest, np.int8(-1))


@dataclass
class ObjectTrack:
    """Per frame, what `track_object` found of the named colour (arrays of length F)."""

    present: np.ndarray  # bool: the frame adheres (plausible object of the named colour, which dominates)
    area: np.ndarray  # the mask's share of the frame
    share: np.ndarray  # the named colour's share of the frame's object pixels (0 without any)
    compactness: np.ndarray  # share of the mask within twice the equal-area radius of its centroid
    centroid: np.ndarray  # (F, 2) row, column in pixels of the mask's core; NaN where not present
    fill_ratio: np.ndarray  # the core's area over its bounding box's; NaN where not present
    dominant: list[str | None]  # per frame, the palette colour with most object pixels (None: none)


def track_object(frames: np.ndarray, colour: str) -> ObjectTrack:
    """Finds the object of `colour` (a name of toyvideo.COLOURS) in every frame (module docstring, adherence).

    The centroid and the fill ratio are those of the mask's *core*: its pixels within twice the
    equal-area radius of the mask's centroid, so a few stray pixels elsewhere do not move them.
    """
    if colour not in COLOURS:
        raise ValueError(f"colour {colour!r}: not one of {', '.join(COLOUR_NAMES)}")
    labels = colour_labels(frames)
    count, height, width = labels.shape
    named = COLOUR_NAMES.index(colour)
    pixels = height * width
    counts = np.stack([(labels == k).sum(axis=(1, 2)) for k in range(len(COLOUR_NAMES))], axis=1)
    saturated = counts.sum(axis=1)
    mask_sizes = counts[:, named]
    area = mask_sizes / pixels
    share = np.where(saturated > 0, mask_sizes / np.maximum(saturated, 1), 0.0)
    compactness = np.zeros(count)
    centroid = np.full((count, 2), np.nan)
    fill = np.full(count, np.nan)
    rows, cols = np.mgrid[0:height, 0:width]
    for f in range(count):
        if mask_sizes[f] == 0:
            continue
        ys, xs = rows[labels[f] == named], cols[labels[f] == named]
        radius = 2.0 * math.sqrt(mask_sizes[f] / math.pi)
        core = (ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2 <= radius**2
        compactness[f] = core.mean()
        if not core.any():  # scattered pixels around an empty middle
            continue
        ys, xs = ys[core], xs[core]
        centroid[f] = ys.mean(), xs.mean()
        fill[f] = len(ys) / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    present = ((area >= MIN_OBJECT_AREA) & (area <= MAX_OBJECT_AREA) & (compactness >= MIN_COMPACTNESS)
               & (share > 0.5))
    centroid[~present] = np.nan
    fill[~present] = np.nan
    dominant = [COLOUR_NAMES[int(c.argmax())] if c.sum() else None for c in counts]
    return ObjectTrack(present, area, share, compactness, centroid, fill, dominant)


def adherence(frames: np.ndarray, colour: str, shape: str | None = None, track: ObjectTrack | None = None) -> dict:
    """Prompt adherence (module docstring): `adherence` (fraction of frames, 1.0 = all show the named colour
    as the dominant plausible object), `fill_ratio` (mean over those frames; None without any) and, with a
    `shape`, `shape_match` (fraction of those frames whose fill ratio is nearest the shape's). `track`:
    `track_object(frames, colour)` if already made."""
    track = track_object(frames, colour) if track is None else track
    result = {"adherence": float(track.present.mean())}
    fills = track.fill_ratio[track.present]
    result["fill_ratio"] = float(fills.mean()) if len(fills) else None
    if shape is not None:
        if shape not in SHAPES:
            raise ValueError(f"shape {shape!r}: not one of {', '.join(SHAPES)}")
        if shape not in SHAPE_FILL:
            result["shape_match"] = None
            return result
        names = list(SHAPE_FILL)
        expected = np.array([SHAPE_FILL[s] for s in names])
        nearest = [names[int(np.abs(expected - value).argmin())] for value in fills]
        result["shape_match"] = float(np.mean([n == shape for n in nearest])) if nearest else None
    return result


def block_boundaries(num_frames: int, block_size: int, context: int = 0) -> list[int]:
    """Video frames i that start a new latent block (frame i-1 is the previous block's last), ascending.

    `num_frames` video frames (4k+1) make k+1 latent frames; `block_size` (B) and `context` (c) are in
    latent frames, as in the config. The blocks are the project's (`BlockTimeline`): K = max(1, (F - c) // B)
    blocks, block 0 holding the frames left over, so block b ≥ 1 starts at latent frame s = len(block 0) +
    (b-1)·B, that is at video frame 4s-3 (latent frame 0 is video frame 0; latent frame k ≥ 1 is video
    frames 4k-3 … 4k). E.g. 21 frames (6 latent), B = 2, c = 0: blocks [0,2) [2,4) [4,6), boundaries 5, 13.
    """
    if num_frames < 1 or (num_frames - 1) % TEMPORAL_FACTOR:
        raise ValueError(f"num_frames must be 4k+1 >= 1, got {num_frames}")
    latent = (num_frames - 1) // TEMPORAL_FACTOR + 1
    timeline = BlockTimeline(latent, block_size, context, 1)
    return [TEMPORAL_FACTOR * timeline.block_start(b) - (TEMPORAL_FACTOR - 1) for b in range(1, timeline.num_blocks)]


def latent_transitions(num_frames: int) -> list[int]:
    """Video frames i ≥ 5 that start a latent frame (i = 4k-3, k ≥ 2). Frame 1 is left out: latent frame 0 is
    decoded alone (the VAE's first chunk), so its transition is unlike the others."""
    return list(range(2 * TEMPORAL_FACTOR - (TEMPORAL_FACTOR - 1), num_frames, TEMPORAL_FACTOR))


def frame_changes(frames: np.ndarray) -> np.ndarray:
    """changes[i - 1] = mean absolute difference (levels of 255, all pixels and channels) of frames i-1 and i."""
    video = _check_video(frames).astype(np.int16)
    return np.abs(np.diff(video, axis=0)).mean(axis=(1, 2, 3))


def _reference(num_frames: int, boundaries: list[int], pairs: str) -> list[int]:
    """The frames i whose pair (i-1, i) the boundaries are compared with: other latent transitions, or all."""
    if pairs == "latent":
        candidates = latent_transitions(num_frames)
    elif pairs == "all":
        candidates = range(1, num_frames)
    else:
        raise ValueError(f"pairs must be 'latent' or 'all', got {pairs!r}")
    cut = set(boundaries)
    return [i for i in candidates if i not in cut]


def _ratio(values: np.ndarray, boundaries: list[int], reference: list[int], epsilon: float) -> float | None:
    """mean(values at boundaries) / mean(values at reference), each + epsilon; values[i-1] is pair (i-1, i).
    NaN values (no measurement) are skipped; None when either side has none."""
    at = values[np.asarray(boundaries, dtype=int) - 1] if boundaries else np.array([])
    inside = values[np.asarray(reference, dtype=int) - 1] if reference else np.array([])
    at, inside = at[~np.isnan(at)], inside[~np.isnan(inside)]
    if not len(at) or not len(inside):
        return None
    return float((at.mean() + epsilon) / (inside.mean() + epsilon))


def _check_boundaries(num_frames: int, boundaries: list[int]) -> list[int]:
    boundaries = sorted(set(int(i) for i in boundaries))
    if boundaries and not (1 <= boundaries[0] and boundaries[-1] < num_frames):
        raise ValueError(f"boundaries must be frames in [1, {num_frames}), got {boundaries}")
    return boundaries


def seam_ratio(frames: np.ndarray, boundaries: list[int], pairs: str = "latent") -> float | None:
    """Mean frame change at `boundaries` over the mean change at the other latent transitions (`pairs`
    = "latent") or at every other pair of consecutive frames ("all"); 1.0 = no seam. None without a
    boundary or without a pair to compare with."""
    changes = frame_changes(frames)
    boundaries = _check_boundaries(len(frames), boundaries)
    return _ratio(changes, boundaries, _reference(len(frames), boundaries, pairs), SEAM_EPSILON)


def centroid_jumps(track: ObjectTrack) -> np.ndarray:
    """jumps[i - 1] = distance in pixels between the object's centroids in frames i-1 and i; NaN unless
    both frames have the object."""
    return np.linalg.norm(np.diff(track.centroid, axis=0), axis=1)


def motion_jump_ratio(frames: np.ndarray, colour: str, boundaries: list[int], pairs: str = "latent",
                      track: ObjectTrack | None = None) -> float | None:
    """Mean centroid jump of the `colour` object at `boundaries` over the mean jump at the other latent
    transitions (or every other pair, `pairs` = "all"); 1.0 = as smooth at boundaries as inside blocks.
    Pairs where either frame lacks the object are skipped; None if a side has no pair left."""
    track = track_object(frames, colour) if track is None else track
    boundaries = _check_boundaries(len(frames), boundaries)
    return _ratio(centroid_jumps(track), boundaries, _reference(len(frames), boundaries, pairs), JUMP_EPSILON)


def colour_histogram(frames: np.ndarray, bins: int = DRIFT_BINS) -> np.ndarray:
    """Joint RGB histogram of all pixels of `frames`, normalised to sum 1, flat (`bins`³ entries).

    Soft binning: the bin centres are `bins` evenly spaced levels from 0 to 255 and each pixel is shared
    among the 8 centres around it in proportion to its nearness (trilinear), so a colour shift moves
    weight gradually from bin to bin instead of all at once when it crosses a bin edge.
    """
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    video = _check_video(frames).reshape(-1, 3).astype(np.float64)
    position = video * (bins - 1) / 255.0
    low = np.minimum(np.floor(position).astype(np.int64), bins - 2)
    upper = position - low  # weight of the upper centre, per channel
    counts = np.zeros(bins**3)
    for corner in range(8):
        offset = np.array([(corner >> 2) & 1, (corner >> 1) & 1, corner & 1])
        weight = np.prod(np.where(offset == 1, upper, 1.0 - upper), axis=1)
        index = low + offset
        flat = (index[:, 0] * bins + index[:, 1]) * bins + index[:, 2]
        counts += np.bincount(flat, weights=weight, minlength=bins**3)
    return counts / counts.sum()


def drift(frames: np.ndarray, fps: int) -> float:
    """Total-variation distance (0..1) of the colour histograms of the first and the last second (`fps`
    frames each; half the video each when it is shorter than two seconds). 0 = no drift."""
    video = _check_video(frames)
    if fps < 1:
        raise ValueError(f"fps must be >= 1, got {fps}")
    window = max(1, min(fps, len(video) // 2))
    first, last = colour_histogram(video[:window]), colour_histogram(video[-window:])
    return float(0.5 * np.abs(first - last).sum())


def background_image(frames: np.ndarray) -> np.ndarray:
    """(H, W) float grey levels of the static background: per pixel the median over the frames where it is no
    object pixel (`colour_labels`); a pixel that is an object pixel in every frame takes the overall median."""
    video = _check_video(frames)
    grey = video.astype(np.float32).mean(axis=-1)
    grey[colour_labels(video) >= 0] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # pixels that are object pixels throughout: filled below
        image = np.nanmedian(grey, axis=0)
    fill = np.nanmedian(image) if np.isfinite(image).any() else 0.0
    return np.where(np.isfinite(image), image, fill)


def background_texture(frames: np.ndarray) -> str:
    """The toy background (a word of toyvideo.BACKGROUNDS) that the frames' static background looks like.

    From the background's power spectrum (Hann window, mean removed), in cycles per frame side: mostly
    below CLOUDY_CYCLES is "cloudy"; else, if most of the periodic energy lies along one orientation,
    "striped" (also when a wider fan of angles about one orientation holds it and little lies across it:
    wavy stripes); else a grid: "dotted" when its minority tone (above or below the middle of the 5th and
    95th percentile levels) covers less than DOT_MINORITY of the frame, "checkered" when the two tones
    are about even.
    """
    image = background_image(frames)
    height, width = image.shape
    window = np.outer(np.hanning(height), np.hanning(width))
    power = np.abs(np.fft.fft2((image - image.mean()) * window)) ** 2
    side = min(height, width)
    fy = np.fft.fftfreq(height) * side  # cycles per shorter side
    fx = np.fft.fftfreq(width) * side
    fy, fx = np.meshgrid(fy, fx, indexing="ij")
    radius = np.hypot(fx, fy)
    usable = (radius >= 1.0) & (radius <= side / 4)
    total = power[usable].sum()
    if total <= 0:
        return "cloudy"  # a flat background: no pattern at all
    if power[usable & (radius < CLOUDY_CYCLES)].sum() / total >= CLOUDY_SHARE:
        return "cloudy"
    periodic = usable & (radius >= CLOUDY_CYCLES)
    angle = np.degrees(np.arctan2(fy, fx))[periodic] % 180.0
    energy = power[periodic]
    # the dominant orientation, then the share of energy within STRIPE_ANGLE of it (angles mod 180)
    candidates = np.arange(0.0, 180.0, 2.0)
    offset = np.abs((angle[None] - candidates[:, None] + 90.0) % 180.0 - 90.0)  # (candidates, bins), degrees
    shares = lambda width: ((offset <= width) * energy[None]).sum(axis=1) / energy.sum()  # noqa: E731
    if shares(STRIPE_ANGLE).max() >= STRIPE_CONCENTRATION:
        return "striped"
    wide = shares(WAVY_ANGLE)
    best = int(wide.argmax())
    across = wide[(best + len(candidates) // 2) % len(candidates)]  # the candidate 90 degrees away
    if wide[best] >= STRIPE_CONCENTRATION and across <= ACROSS_SHARE:
        return "striped"
    low, high = np.percentile(image, [5, 95])
    bright = (image > (low + high) / 2).mean()
    return "dotted" if min(bright, 1.0 - bright) < DOT_MINORITY else "checkered"


def object_motion(track: ObjectTrack, frames: slice | None = None) -> str | None:
    """How the tracked object moves over `frames` (all by default), as a word of toyvideo.MOTIONS: "turns"
    for an object that stays within STILL_TRAVEL pixels (a turning shape stays put), "moves sideways" or
    "moves up and down" when the travel along the other axis is under ONE_AXIS_RATIO of it, else "bounces".
    None with fewer than two frames that have the object."""
    centroid = track.centroid if frames is None else track.centroid[frames]
    centroid = centroid[~np.isnan(centroid).any(axis=1)]
    if len(centroid) < 2:
        return None
    travel_y, travel_x = np.percentile(centroid, 95, axis=0) - np.percentile(centroid, 5, axis=0)
    if max(travel_x, travel_y) < STILL_TRAVEL:
        return MOTIONS[3]
    if travel_y < ONE_AXIS_RATIO * travel_x:
        return MOTIONS[0]
    if travel_x < ONE_AXIS_RATIO * travel_y:
        return MOTIONS[1]
    return MOTIONS[2]


def seconds_windows(num_frames: int, fps: int) -> dict[str, slice]:
    """The first, middle and last second of a video (`fps` frames each; a third of a video shorter than
    three seconds)."""
    if fps < 1:
        raise ValueError(f"fps must be >= 1, got {fps}")
    length = max(1, min(fps, num_frames // 3))
    middle = (num_frames - length) // 2
    return {"first": slice(0, length), "middle": slice(middle, middle + length),
            "last": slice(num_frames - length, num_frames)}


def along_video(frames: np.ndarray, colour: str, fps: int, shape: str | None = None, motion: str | None = None,
                background: str | None = None, track: ObjectTrack | None = None) -> dict:
    """Adherence, and for each word given whether it is followed, in the first, middle and last second
    (`seconds_windows`): `adherence_first` ... (fraction of the window's frames), `shape_first` (the
    window's shape_match), `motion_first` and `background_first` (1.0 when the window's motion or
    background is the named one, else 0.0). Drift along the video is the fall from first to last."""
    frames = _check_video(frames)
    track = track_object(frames, colour) if track is None else track
    result = {}
    for name, window in seconds_windows(len(frames), fps).items():
        result[f"adherence_{name}"] = float(track.present[window].mean())
        if shape is not None:
            part = ObjectTrack(*(getattr(track, f.name)[window] for f in dataclasses.fields(ObjectTrack)))
            result[f"shape_{name}"] = adherence(frames[window], colour, shape, part)["shape_match"]
        if motion is not None:
            seen = object_motion(track, window)
            result[f"motion_{name}"] = None if seen is None else float(seen == motion)
        if background is not None:
            result[f"background_{name}"] = float(background_texture(frames[window]) == background)
    return result


def score_video(frames: np.ndarray, colour: str, boundaries: list[int], fps: int, shape: str | None = None,
                motion: str | None = None, background: str | None = None) -> dict:
    """Every metric of one video (module docstring) as a dict of floats (None where undefined):
    adherence, fill_ratio, shape_match (with `shape`), seam_ratio, seam_ratio_all_pairs, motion_jump_ratio,
    motion_jump_ratio_all_pairs, drift, and object_frames (frames with a plausible object of the named
    colour, the same as adherence's count) and dominant_colour (the palette colour that dominates most
    frames, None if no frame has an object pixel)."""
    frames = _check_video(frames)
    track = track_object(frames, colour)
    result = adherence(frames, colour, shape, track)
    result["object_frames"] = int(track.present.sum())
    named = [d for d in track.dominant if d is not None]
    result["dominant_colour"] = max(COLOUR_NAMES, key=named.count) if named else None
    for pairs, suffix in (("latent", ""), ("all", "_all_pairs")):
        result["seam_ratio" + suffix] = seam_ratio(frames, boundaries, pairs)
        result["motion_jump_ratio" + suffix] = motion_jump_ratio(frames, colour, boundaries, pairs, track)
    result["drift"] = drift(frames, fps)
    if motion is not None:
        seen = object_motion(track)
        result["object_motion"] = seen
        result["motion_match"] = None if seen is None else float(seen == motion)
    if background is not None:
        result["background_texture"] = background_texture(frames)
        result["background_match"] = float(result["background_texture"] == background)
    result.update(along_video(frames, colour, fps, shape, motion, background, track))
    return result
