"""Procedural toy videos: one coloured shape moving over a muted textured background, with its prompt.

The tiny model in `assets/tiny-wan` is trained on these (`launch/train_tiny.py`) and the quality
benchmark (`launch/quality.py`) scores generated videos against the same vocabulary: the object's
colour is the only strongly saturated colour in a frame, the background never is.

Words in the prompts (all in the tiny tokenizer's vocabulary):
    "a {colour} {shape} {motion} over a {background} background"
"""

from __future__ import annotations

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


def prompt(colour: str, shape: str, motion: str, background: str) -> str:
    return f"a {colour} {shape} {motion} over a {background} background"
