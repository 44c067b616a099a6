"""The procedural toy videos (ds_dualparal.toy.toyvideo) and the tiny tokenizer and random weights around them."""

import hashlib
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from ds_dualparal.toy import toyvideo as tv
from ds_dualparal.toy.tiny import build_tokenizer, write_tiny_wan
from ds_dualparal.wan.weights import TINY_WAN_PATH

H = W = 64

# SHA-256 of write_tiny_wan(seed=0)'s transformer tensors (sorted names, dtype, shape, bytes): the random
# weights committed in assets/tiny-wan before the trained model (launch/train_tiny.py) replaced them.
RANDOM_TINY_TRANSFORMER_SHA256 = "ed395463b99a595d81b53f942858dc17e439ed9fb173d41fcca16a9d1d0fa4a5"


def specs_of(n, seed=0, **words):
    return tv.sample_specs(n, torch.Generator().manual_seed(seed), **words)


@pytest.fixture(scope="module")
def many():
    """Every (shape, motion, background) at least twice, colours cycling, 33 frames each."""
    specs = []
    for i, (shape, motion, background) in enumerate(
        (s, m, b) for s in tv.SHAPES for m in tv.MOTIONS for b in tv.BACKGROUNDS
    ):
        colour = list(tv.COLOURS)[i % len(tv.COLOURS)]
        specs += specs_of(2, seed=i, colour=colour, shape=shape, motion=motion, background=background)
    frames, alpha = tv.render_batch(specs, 33, H, W, return_alpha=True)
    return specs, frames, alpha


def centroids(alpha):
    """(F, H, W) coverage -> (F, 2) coverage-weighted (x, y) in pixels."""
    ys = torch.arange(alpha.shape[-2], dtype=torch.float64) + 0.5
    xs = torch.arange(alpha.shape[-1], dtype=torch.float64) + 0.5
    a = alpha.double()
    mass = a.sum((-2, -1))
    return torch.stack([(a * xs).sum((-2, -1)) / mass, (a * ys[:, None]).sum((-2, -1)) / mass], dim=-1)


def test_palette_colours_are_saturated_and_prompts_cover_the_vocabulary():
    for name in tv.COLOURS:
        assert tv.hsv_saturation(tv.palette(name), dim=0) >= tv.OBJECT_MIN_SATURATION, name
    prompts = tv.all_prompts()
    assert len(prompts) == len(set(prompts)) == 5 * 3 * 4 * 4
    spec = specs_of(1, colour="red", shape="circle", motion="turns", background="dotted")[0]
    assert spec.prompt == "a red circle turns over a dotted background" == tv.prompt("red", "circle", "turns", "dotted")
    assert spec.prompt in prompts


def test_sampling_is_seeded_and_fixing_a_word_leaves_the_rest():
    assert specs_of(5, seed=3) == specs_of(5, seed=3)
    assert specs_of(5, seed=3) != specs_of(5, seed=4)
    assert tv.sample_spec(torch.Generator().manual_seed(3)) == specs_of(1, seed=3)[0]
    free = specs_of(1, seed=7)[0]
    fixed = specs_of(1, seed=7, colour="blue" if free.colour != "blue" else "red")[0]
    assert fixed.colour != free.colour
    assert (fixed.size, fixed.start, fixed.texture_seed) == (free.size, free.start, free.texture_seed)
    with pytest.raises(ValueError, match="colour 'pink'"):
        specs_of(1, colour="pink")
    assert tv.ToySpec.from_dict(json.loads(json.dumps(free.to_dict()))) == free


def test_sampled_parameters_are_in_range():
    for spec in specs_of(400, seed=1):
        assert tv.SIZE_RANGE[0] <= spec.size <= tv.SIZE_RANGE[1]
        speed = math.hypot(*spec.velocity)
        if spec.motion == "turns":
            assert speed == 0 and tv.ANGULAR_SPEED_RANGE[0] <= abs(spec.angular_speed) <= tv.ANGULAR_SPEED_RANGE[1]
        else:
            assert spec.angular_speed == 0
            assert tv.SPEED_RANGE[0] - 1e-12 <= speed <= tv.SPEED_RANGE[1] + 1e-12
            assert (spec.velocity[1] == 0) == (spec.motion == "moves sideways")
            assert (spec.velocity[0] == 0) == (spec.motion == "moves up and down")
        assert spec.tint[1] <= tv.BACKGROUND_MAX_SATURATION


def test_render_is_deterministic_and_batch_independent(many):
    specs, frames, _ = many
    assert frames.dtype == torch.float32 and frames.shape == (len(specs), 33, 3, H, W)
    again = tv.render(specs[5], 33, H, W)
    assert torch.equal(again, frames[5])
    assert torch.equal(tv.render_batch(specs[3:9], 33, H, W), frames[3:9])
    assert not torch.equal(frames[0], frames[1])


def test_values_are_in_range_and_every_frame_shows_the_object(many):
    _, frames, alpha = many
    assert frames.min() >= -1 and frames.max() <= 1
    assert ((alpha >= 0) & (alpha <= 1)).all()
    solid = (alpha == 1).flatten(2).sum(-1)  # fully covered pixels per frame
    assert solid.min() >= 0.5 * (tv.SIZE_RANGE[0] * H) ** 2 * 0.4, "object too small somewhere"
    assert (alpha.flatten(2).sum(-1) <= (0.5 * H) ** 2).all(), "object too large somewhere"


def test_object_pixels_are_the_palette_colour_and_background_is_muted(many):
    specs, frames, alpha = many
    for i, spec in enumerate(specs):
        rgb = frames[i].permute(0, 2, 3, 1)  # (F, H, W, 3)
        inside = alpha[i] == 1
        assert (rgb[inside] == tv.palette(spec.colour)).all(), spec
        sat = tv.hsv_saturation(frames[i], dim=1)  # (F, H, W)
        background = alpha[i] == 0
        assert background.any()
        assert sat[background].max() <= tv.BACKGROUND_MAX_SATURATION, spec
        assert sat[inside].min() >= tv.OBJECT_MIN_SATURATION


def test_backgrounds_are_textured_and_static(many):
    specs, frames, alpha = many
    for i, spec in enumerate(specs):
        background = (alpha[i] == 0).all(0)  # pixels the object never touches
        values = frames[i, :, :, background]  # (F, 3, n)
        assert (values == values[:1]).all(), "background moves"
        assert values[0].std(dim=-1).max() > 0.03, f"flat {spec.background} background"


@pytest.mark.parametrize("motion", ["moves sideways", "moves up and down", "bounces"])
def test_translation_moves_the_centroid_and_stays_inside(motion):
    specs = specs_of(12, seed=11, motion=motion)
    alpha = tv.render_batch(specs, 129, H, W, return_alpha=True)[1]
    for spec, a in zip(specs, alpha):
        # never touches the border, so it is always whole: its area stays the same
        assert a[:, 0].max() == 0 and a[:, -1].max() == 0 and a[:, :, 0].max() == 0 and a[:, :, -1].max() == 0
        area = a.sum((-2, -1))
        assert (area - area[0]).abs().max() < 0.02 * area[0]
        c = centroids(a)
        step = (c[1:] - c[:-1]).norm(dim=-1)
        speed_px = math.hypot(*spec.velocity) * H
        assert step.max() <= speed_px + 0.1  # plus the edges' sampling jitter
        assert step.median() >= 0.9 * speed_px, "the object does not move at its speed"
        moving = [0, 1] if motion == "bounces" else ([0] if motion == "moves sideways" else [1])
        still = [k for k in (0, 1) if k not in moving]
        for k in still:
            assert (c[:, k] - c[0, k]).abs().max() < 0.1  # the edges' sampling jitter
        for k in moving:
            # 129 frames at >= 1 px/frame cross the free span at least once: the direction reverses
            velocity = c[1:, k] - c[:-1, k]
            assert (velocity > 0).any() and (velocity < 0).any(), f"{spec} never reflects"


def test_turns_rotate_in_place():
    for shape in ("square", "triangle", "circle"):
        for spec in specs_of(4, seed=5, shape=shape, motion="turns"):
            alpha = tv.render_batch([spec], 40, H, W, return_alpha=True)[1][0]
            c = centroids(alpha)
            assert (c - c[0]).norm(dim=-1).max() < 0.1  # sampling jitter of the edges only
            change = (alpha[10] - alpha[0]).abs().sum()
            if shape == "circle":
                assert change < 1e-3
            else:
                assert change > 10, "the shape does not rotate"


def test_every_prompt_word_is_a_known_token():
    tokenizer = build_tokenizer()
    for text in tv.all_prompts() + [""]:
        ids = tokenizer(text).input_ids
        assert tokenizer.unk_token_id not in ids, text
        assert ids[-1] == tokenizer.eos_token_id
        assert len(ids) == len(text.split()) + 1  # one token a word
    assert tokenizer.vocab_size <= 256


def test_token_ids_of_the_committed_tokenizer_are_kept():
    committed = AutoTokenizer.from_pretrained(TINY_WAN_PATH / "tokenizer").get_vocab()
    current = build_tokenizer().get_vocab()
    assert {word: current.get(word) for word in committed} == committed


def test_write_tiny_wan_keeps_its_random_weights(tmp_path):
    write_tiny_wan(tmp_path, seed=0)
    folder = tmp_path / "transformer"
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(folder / shard))
    digest = hashlib.sha256()
    for name in sorted(tensors):
        x = tensors[name].contiguous()
        digest.update(name.encode())
        digest.update(str(x.dtype).encode())
        digest.update(str(tuple(x.shape)).encode())
        digest.update(x.numpy().tobytes())
    assert digest.hexdigest() == RANDOM_TINY_TRANSFORMER_SHA256
