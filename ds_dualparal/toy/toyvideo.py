"""Procedural toy videos: one coloured shape moving over a muted textured background, with its prompt.

The tiny model in `assets/tiny-wan` is trained on these (`launch/train_tiny.py`) and the quality
benchmark (`launch/quality.py`) scores generated videos against the same vocabulary: the object's
colour is the only strongly saturated colour in a frame, the background never is.

Words in the prompts (all in the tiny tokenizer's vocabulary):
    "a {colour} {shape} {motion} over a {background} background"

A clip is described by a `ToySpec` (the four words plus the continuous parameters: size, start,
velocity, orientation, texture) and drawn by `render` / `render_batch` as floats in [-1, 1], the
range Wan's VAE takes. Rendering is a pure function of the spec and the frame size (no randomness),
vectorised over clips, frames and pixels; `sample_spec` / `sample_specs` draw specs from a
`torch.Generator`.

Geometry, in pixels of a frame of height H and width W, with S = min(H, W):
- the object is anti-aliased: a pixel's coverage is `clamp(0.5 - d, 0, 1)` for its signed distance
  `d` to the shape's edge, so pixels deeper than half a pixel inside hold exactly the palette colour;
- translation is reflected at the frame's edges, keeping the shape's circumscribed circle inside;
- "turns" spins the shape about its centre (its centroid) at a fixed position;
- the background is static: two tones of one muted hue (HSV saturation at most
  `BACKGROUND_MAX_SATURATION - 0.05`, so any mix of them is below the bound) mixed by a pattern.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Sequence

import torch

# RGB in 0..255, saturated and far apart in hue; backgrounds stay below BACKGROUND_MAX_SATURATION.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 45, 45),
    "green": (45, 195, 70),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 45),
    "purple": (170, 60, 215),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# sideways / up and down: constant speed, reflected at the frame's edges; bounces: diagonal, reflected;
# turns: rotates in place about its centre (a circle turning looks static).
MOTIONS: tuple[str, ...] = ("moves sideways", "moves up and down", "bounces", "turns")
BACKGROUNDS: tuple[str, ...] = ("striped", "checkered", "dotted", "cloudy")

BACKGROUND_MAX_SATURATION = 0.25  # HSV saturation of every background pixel
OBJECT_MIN_SATURATION = 0.6  # HSV saturation of every object colour above

PROMPT_TEMPLATE = "a {colour} {shape} {motion} over a {background} background"

# Ranges of the continuous parameters `sample_specs` draws (uniformly).
SIZE_RANGE = (0.25, 0.35)  # object size, fraction of the frame's shorter side
SPEED_RANGE = (1.0 / 64, 2.0 / 64)  # frame sides per video frame: 1-2 px a frame at 64x64
ANGULAR_SPEED_RANGE = (0.05, 0.12)  # radians per video frame ("turns")
BOUNCE_ANGLE_RANGE = (25.0, 65.0)  # degrees from the horizontal ("bounces")
TEXTURE_SCALE_RANGE = (0.14, 0.26)  # stripe period, checker cell, dot spacing: fraction of the shorter side
TINT_SATURATION_MAX = BACKGROUND_MAX_SATURATION - 0.05
TINT_VALUE_RANGE = (0.3, 0.75)
CONTRAST_RANGE = (0.12, 0.3)  # HSV value between the background's two tones

# Shape size: circle diameter, square side, triangle side are SHAPE_EXTENT * size (roughly equal areas).
SHAPE_EXTENT = {"circle": 1.0, "square": 0.9, "triangle": 1.25}
# Circumradius / extent: the radius of the circle that holds the shape whatever its rotation.
_CIRCUMRADIUS = {"circle": 0.5, "square": math.sqrt(0.5), "triangle": 1.0 / math.sqrt(3.0)}
_CLOUD_WAVES = 6


def prompt(colour: str, shape: str, motion: str, background: str) -> str:
    return PROMPT_TEMPLATE.format(colour=colour, shape=shape, motion=motion, background=background)


def all_prompts() -> list[str]:
    """Every prompt of the vocabulary, in a fixed order (colours, shapes, motions, backgrounds nested)."""
    return [prompt(*words) for words in itertools.product(COLOURS, SHAPES, MOTIONS, BACKGROUNDS)]


def palette(colour: str) -> torch.Tensor:
    """The colour's RGB in [-1, 1] (float32), as `render` writes it inside the object."""
    return _unit_rgb(colour) * 2.0 - 1.0


def _unit_rgb(colour: str) -> torch.Tensor:
    return torch.tensor(COLOURS[colour], dtype=torch.float32) / 255.0


def hsv_saturation(rgb: torch.Tensor, dim: int = -3) -> torch.Tensor:
    """HSV saturation (max - min) / max of RGB values in [-1, 1] along `dim` (0 for black)."""
    rgb = (rgb.float() + 1.0) / 2.0
    high = rgb.amax(dim=dim)
    low = rgb.amin(dim=dim)
    return torch.where(high > 0, (high - low) / high.clamp_min(1e-12), torch.zeros_like(high))


@dataclasses.dataclass(frozen=True)
class ToySpec:
    """One toy clip: the four prompt words and the continuous parameters that place and texture them.

    Lengths are fractions of the frame's shorter side S, times are video frames.
    """

    colour: str
    shape: str
    motion: str
    background: str
    size: float  # object size (see SHAPE_EXTENT), fraction of S
    start: tuple[float, float]  # (x, y) in [0, 1]: the centre's start within the range that keeps it inside
    velocity: tuple[float, float]  # (vx, vy) in S per frame, image axes (y down); (0, 0) for "turns"
    angle: float  # orientation at frame 0, radians
    angular_speed: float  # radians per frame; 0 unless "turns"
    texture_scale: float  # stripe period, checker cell or dot spacing, fraction of S
    texture_angle: float  # rotation of the stripes, checkers or dot grid, radians
    texture_phase: tuple[float, float]  # offsets of the pattern, in periods
    texture_seed: int  # the cloudy background's waves
    tint: tuple[float, float, float]  # HSV (hue in [0, 1), saturation, value) of the first tone
    contrast: float  # HSV value between the two tones

    def __post_init__(self):
        for field, vocabulary in (("colour", COLOURS), ("shape", SHAPES), ("motion", MOTIONS),
                                  ("background", BACKGROUNDS)):
            if getattr(self, field) not in vocabulary:
                raise ValueError(f"{field} {getattr(self, field)!r} is not one of {list(vocabulary)}")
        if not 0.0 <= self.tint[1] <= TINT_SATURATION_MAX:
            raise ValueError(f"tint saturation {self.tint[1]} is outside [0, {TINT_SATURATION_MAX}]")

    @property
    def prompt(self) -> str:
        return prompt(self.colour, self.shape, self.motion, self.background)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ToySpec":
        """The inverse of `to_dict` (also after a JSON round trip, which turns tuples into lists)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def _check_word(name: str, value, vocabulary) -> None:
    if value is not None and value not in vocabulary:
        raise ValueError(f"{name} {value!r} is not one of {list(vocabulary)}")


def sample_specs(
    n: int,
    generator: torch.Generator,
    *,
    colour: str | None = None,
    shape: str | None = None,
    motion: str | None = None,
    background: str | None = None,
) -> list[ToySpec]:
    """`n` specs with words drawn uniformly from the vocabulary and continuous parameters from the ranges above.

    A word given as an argument is used instead of the drawn one; the generator advances the same
    either way, so fixing a word leaves every other parameter as it would have been.
    """
    for name, value, vocabulary in (("colour", colour, COLOURS), ("shape", shape, SHAPES),
                                    ("motion", motion, MOTIONS), ("background", background, BACKGROUNDS)):
        _check_word(name, value, vocabulary)
    sizes = torch.tensor([len(COLOURS), len(SHAPES), len(MOTIONS), len(BACKGROUNDS)], dtype=torch.float64)
    words = (torch.rand(n, 4, generator=generator, dtype=torch.float64) * sizes).long().tolist()
    u = torch.rand(n, 17, generator=generator, dtype=torch.float64).tolist()
    seeds = torch.randint(0, 2**31 - 1, (n,), generator=generator).tolist()
    colours = list(COLOURS)

    def lerp(bounds, t):
        return bounds[0] + (bounds[1] - bounds[0]) * t

    specs = []
    for (ci, si, mi, bi), r, seed in zip(words, u, seeds):
        spec_motion = motion or MOTIONS[mi]
        speed = lerp(SPEED_RANGE, r[3])
        sx = 1.0 if r[4] < 0.5 else -1.0
        sy = 1.0 if r[5] < 0.5 else -1.0
        if spec_motion == "moves sideways":
            velocity = (sx * speed, 0.0)
        elif spec_motion == "moves up and down":
            velocity = (0.0, sy * speed)
        elif spec_motion == "bounces":
            a = math.radians(lerp(BOUNCE_ANGLE_RANGE, r[6]))
            velocity = (sx * speed * math.cos(a), sy * speed * math.sin(a))
        else:
            velocity = (0.0, 0.0)
        angular_speed = sx * lerp(ANGULAR_SPEED_RANGE, r[7]) if spec_motion == "turns" else 0.0
        specs.append(ToySpec(
            colour=colour or colours[ci],
            shape=shape or SHAPES[si],
            motion=spec_motion,
            background=background or BACKGROUNDS[bi],
            size=lerp(SIZE_RANGE, r[0]),
            start=(r[1], r[2]),
            velocity=velocity,
            angle=2.0 * math.pi * r[8],
            angular_speed=angular_speed,
            texture_scale=lerp(TEXTURE_SCALE_RANGE, r[9]),
            texture_angle=math.pi * r[10],
            texture_phase=(r[11], r[12]),
            texture_seed=int(seed),
            tint=(r[13], TINT_SATURATION_MAX * r[14], lerp(TINT_VALUE_RANGE, r[15])),
            contrast=lerp(CONTRAST_RANGE, r[16]),
        ))
    return specs


def sample_spec(generator: torch.Generator, **words) -> ToySpec:
    """One spec: `sample_specs(1, generator, **words)[0]`."""
    return sample_specs(1, generator, **words)[0]


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(..., ) HSV in [0, 1] -> (..., 3) RGB in [0, 1]."""
    k = torch.arange(5, 0, -2, dtype=h.dtype, device=h.device)  # 5, 3, 1 for R, G, B
    t = torch.remainder(k + h.unsqueeze(-1) * 6.0, 6.0)
    ramp = torch.clamp(torch.minimum(t, 4.0 - t), 0.0, 1.0)
    return v.unsqueeze(-1) - v.unsqueeze(-1) * s.unsqueeze(-1) * ramp


def _reflect(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Fold positions into [low, high] as a point bouncing between two walls would move."""
    span = (high - low).clamp_min(1e-6)
    u = torch.remainder(x - low, 2.0 * span)
    return low + span - (u - span).abs()


# Columns of the packed per-clip parameters (`_pack`).
_FIELDS = ("size", "start_x", "start_y", "vx", "vy", "angle", "angular_speed", "texture_scale", "texture_angle",
           "phase_a", "phase_b", "hue", "saturation", "value", "contrast", "red", "green", "blue")
_COL = {name: i for i, name in enumerate(_FIELDS)}


def _pack(specs: Sequence[ToySpec]) -> torch.Tensor:
    """(N, len(_FIELDS)) float32: every continuous parameter of every clip, and its colour in 0..255."""
    return torch.tensor(
        [[s.size, *s.start, *s.velocity, s.angle, s.angular_speed, s.texture_scale, s.texture_angle, *s.texture_phase,
          *s.tint, s.contrast, *COLOURS[s.colour]] for s in specs],
        dtype=torch.float32,
    )


def _upload(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """To `device` without waiting for the work queued there (pinned, non-blocking copy on CUDA)."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _grouped(specs: Sequence[ToySpec], key: str, vocabulary) -> tuple[list[int], list[int]]:
    """The clips' order sorted (stably) by `key`'s word, and the size of each word's group in that order."""
    order = sorted(range(len(specs)), key=lambda i: vocabulary.index(getattr(specs[i], key)))
    counts = [sum(getattr(s, key) == word for s in specs) for word in vocabulary]
    return order, counts


def _groups(vocabulary, counts: list[int], params: torch.Tensor):
    """(word, its rows of `params`) for each word of `vocabulary` that has rows, the rows grouped in
    vocabulary order (`_grouped`'s counts)."""
    start = 0
    for word, count in zip(vocabulary, counts):
        if count:
            yield word, params[start : start + count]
        start += count


def _inverse(order: list[int]) -> list[int]:
    inverse = [0] * len(order)
    for position, i in enumerate(order):
        inverse[i] = position
    return inverse


def _cloud_waves(seeds: list[int]) -> torch.Tensor:
    """(n, 4, K): per clip, K random waves (x and y frequency in cycles per side, phase, amplitude)."""
    waves = []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        freq = 1.0 + 2.0 * torch.rand(_CLOUD_WAVES, generator=g)
        direction = 2.0 * math.pi * torch.rand(_CLOUD_WAVES, generator=g)
        offset = 2.0 * math.pi * torch.rand(_CLOUD_WAVES, generator=g)
        waves.append(torch.stack([freq * torch.cos(direction), freq * torch.sin(direction), offset, 1.0 / freq]))
    return torch.stack(waves) if waves else torch.zeros(0, 4, _CLOUD_WAVES)


def _background(params: torch.Tensor, counts: list[int], clouds: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, 3, H, W) static backgrounds in [0, 1] of clips grouped by background (`counts` per BACKGROUNDS word)."""
    device = params.device
    side = float(min(height, width))
    y = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / side
    x = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / side
    gy, gx = torch.meshgrid(y, x, indexing="ij")  # (H, W) in units of the shorter side
    patterns = []
    for kind, group in _groups(BACKGROUNDS, counts, params):
        scale = group[:, _COL["texture_scale"]].view(-1, 1, 1)
        theta = group[:, _COL["texture_angle"]].view(-1, 1, 1)
        phase_a = group[:, _COL["phase_a"]].view(-1, 1, 1)
        phase_b = group[:, _COL["phase_b"]].view(-1, 1, 1)
        # pattern coordinates: rotated by theta, in periods
        a = (gx * torch.cos(theta) + gy * torch.sin(theta)) / scale + phase_a
        b = (-gx * torch.sin(theta) + gy * torch.cos(theta)) / scale + phase_b
        px = scale * side  # pixels per period
        if kind == "striped":
            inside = 0.25 - (torch.remainder(a, 1.0) - 0.5).abs()  # > 0 on the stripe, in periods
            p = 0.5 + inside * px
        elif kind == "checkered":
            sa = 0.25 - (torch.remainder(a, 1.0) - 0.5).abs()
            sb = 0.25 - (torch.remainder(b, 1.0) - 0.5).abs()
            p = 0.5 + torch.sign(sa * sb) * torch.minimum(sa.abs(), sb.abs()) * px
        elif kind == "dotted":
            da = torch.remainder(a, 1.0) - 0.5
            db = torch.remainder(b, 1.0) - 0.5
            p = 0.5 + (0.3 - torch.sqrt(da * da + db * db)) * px
        else:  # cloudy: a few random low-frequency waves, deterministic in texture_seed
            w = clouds
            arg = 2.0 * math.pi * (gx[None, None] * w[:, 0, :, None, None] + gy[None, None] * w[:, 1, :, None, None])
            field = (w[:, 3, :, None, None] * torch.sin(arg + w[:, 2, :, None, None])).sum(1)
            field = field / w[:, 3].sum(1).view(-1, 1, 1)  # in [-1, 1], mostly within +-0.5
            p = 0.5 + 1.2 * field
        patterns.append(p.clamp(0.0, 1.0))
    pattern = torch.cat(patterns).unsqueeze(1)  # (N, 1, H, W)

    hue, sat, value = (params[:, _COL[k]] for k in ("hue", "saturation", "value"))
    contrast = params[:, _COL["contrast"]]
    other = torch.where(value < 0.5, value + contrast, value - contrast)
    first = _hsv_to_rgb(hue, sat, value)[..., None, None]  # (N, 3, 1, 1)
    second = _hsv_to_rgb(hue, sat, other)[..., None, None]
    return first * (1.0 - pattern) + second * pattern


def _coverage(params: torch.Tensor, counts: list[int], num_frames: int, height: int, width: int) -> torch.Tensor:
    """(N, F, H, W) the object's anti-aliased coverage in [0, 1], clips grouped by shape (`counts` per SHAPES)."""
    device = params.device
    side = float(min(height, width))
    t = torch.arange(num_frames, device=device, dtype=torch.float32)
    y = torch.arange(height, device=device, dtype=torch.float32) + 0.5
    x = torch.arange(width, device=device, dtype=torch.float32) + 0.5
    alphas = []
    for shape, group in _groups(SHAPES, counts, params):
        extent = group[:, _COL["size"]] * (SHAPE_EXTENT[shape] * side)  # pixels
        radius = extent * _CIRCUMRADIUS[shape]
        start_xy = group[:, [_COL["start_x"], _COL["start_y"]]]
        velocity = group[:, [_COL["vx"], _COL["vy"]]] * side
        lows = radius + 1.0  # the anti-aliased rim reaches half a pixel beyond the shape's edge
        highs = torch.stack([width - lows, height - lows], dim=1)
        centre0 = lows[:, None] + start_xy * (highs - lows[:, None])
        path = centre0[:, None, :] + velocity[:, None, :] * t[None, :, None]  # (n, F, 2)
        cx = _reflect(path[..., 0], lows[:, None], highs[:, 0, None])
        cy = _reflect(path[..., 1], lows[:, None], highs[:, 1, None])
        angle = group[:, _COL["angle"], None] + group[:, _COL["angular_speed"], None] * t[None, :]
        dx = x.view(1, 1, 1, -1) - cx[..., None, None]  # (n, F, 1, W)
        dy = y.view(1, 1, -1, 1) - cy[..., None, None]  # (n, F, H, 1)
        cos = torch.cos(angle)[..., None, None]
        sin = torch.sin(angle)[..., None, None]
        qx = dx * cos + dy * sin  # the pixel in the shape's own (rotated) frame
        qy = -dx * sin + dy * cos
        e = extent.view(-1, 1, 1, 1)
        if shape == "circle":
            d = torch.sqrt(qx * qx + qy * qy) - e / 2
        elif shape == "square":
            ax = qx.abs() - e / 2
            ay = qy.abs() - e / 2
            outside = torch.sqrt(ax.clamp_min(0) ** 2 + ay.clamp_min(0) ** 2)
            d = outside + torch.maximum(ax, ay).clamp_max(0)
        else:  # equilateral triangle about its centroid, apex towards -y at angle 0
            circumradius = e / math.sqrt(3.0)
            corners = [(math.cos(phi), math.sin(phi)) for phi in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
            inside = None
            dist = None
            for k in range(3):
                (ax, ay), (bx, by) = corners[k], corners[(k + 1) % 3]
                ex, ey = (bx - ax) * circumradius, (by - ay) * circumradius  # the edge, corner to corner
                ax, ay = ax * circumradius, ay * circumradius
                # distance to the edge segment, and the side of its line (the corners run clockwise on screen)
                px, py = qx - ax, qy - ay
                t_edge = ((px * ex + py * ey) / (ex * ex + ey * ey)).clamp(0.0, 1.0)
                seg = torch.sqrt((px - t_edge * ex) ** 2 + (py - t_edge * ey) ** 2)
                side_k = ex * py - ey * px >= 0
                dist = seg if dist is None else torch.minimum(dist, seg)
                inside = side_k if inside is None else inside & side_k
            d = torch.where(inside, -dist, dist)
        alphas.append((0.5 - d).clamp(0.0, 1.0))
    return torch.cat(alphas)


def render_batch(
    specs: Sequence[ToySpec],
    num_frames: int,
    height: int,
    width: int,
    device="cpu",
    *,
    return_alpha: bool = False,
):
    """(N, F, 3, H, W) float32 frames in [-1, 1] of `specs`, on `device`.

    With `return_alpha`, also the object's coverage (N, F, H, W): 1 where a pixel is exactly the
    palette colour, 0 where it is background only, in between on the anti-aliased edge. The
    parameters go to the device in a few non-blocking copies, so rendering on a GPU does not wait
    for the work already queued there.
    """
    if not specs:
        raise ValueError("render_batch needs at least one spec")
    if num_frames < 1 or height < 1 or width < 1:
        raise ValueError(f"bad clip size {num_frames}x{height}x{width}")
    device = torch.device(device)
    shape_order, shape_counts = _grouped(specs, "shape", SHAPES)
    background_order, background_counts = _grouped(specs, "background", BACKGROUNDS)
    cloudy = [specs[i].texture_seed for i in background_order if specs[i].background == "cloudy"]
    params = _upload(_pack(specs), device)
    orders = _upload(torch.tensor([shape_order, _inverse(shape_order), background_order, _inverse(background_order)]),
                     device)
    clouds = _upload(_cloud_waves(cloudy), device)

    background = _background(params[orders[2]], background_counts, clouds, height, width)[orders[3]]
    alpha = _coverage(params[orders[0]], shape_counts, num_frames, height, width)[orders[1]]  # (N, F, H, W)
    colour = params[:, _COL["red"] : _COL["blue"] + 1].view(-1, 1, 3, 1, 1) / 255.0
    a = alpha.unsqueeze(2)
    frames = background.unsqueeze(1) * (1.0 - a) + colour * a
    # Where a == 1 the mix is exactly the colour in [0, 1], so the result is exactly palette(colour).
    frames = frames * 2.0 - 1.0
    return (frames, alpha) if return_alpha else frames


def render(spec: ToySpec, num_frames: int, height: int, width: int, device="cpu") -> torch.Tensor:
    """(F, 3, H, W) float32 frames in [-1, 1] of one clip."""
    return render_batch([spec], num_frames, height, width, device)[0]
