"""BlockTimeline: partition, iteration timeline, feature-cache presence and dependencies (docs/DESIGN.md §1)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ds_dualparal.pipeline.timeline import BlockStep, BlockTimeline


@st.composite
def timelines(draw, max_frames=60, max_block=10, max_steps=8):
    block_size = draw(st.integers(1, max_block))
    context = draw(st.integers(0, block_size))
    frames = draw(st.integers(1, max_frames))
    steps = draw(st.integers(1, max_steps))
    return BlockTimeline(frames, block_size, context, steps)


def test_example_partition_with_context():
    tl = BlockTimeline(num_frames=13, block_size=4, context=2, num_steps=3)
    assert tl.num_blocks == 2
    assert tl.num_iterations == 4
    assert [tl.block_len(b) for b in range(2)] == [9, 4]
    assert [tl.block_range(b) for b in range(2)] == [(0, 9), (9, 13)]
    assert [tl.window_range(b) for b in range(2)] == [(0, 9), (7, 13)]


def test_anchor_config_partition():
    tl = BlockTimeline(num_frames=48, block_size=8, context=8, num_steps=10)
    assert tl.num_blocks == 5
    assert tl.block_len(0) == 16
    assert [tl.block_start(b) for b in range(5)] == [0, 16, 24, 32, 40]
    assert tl.window_range(1) == (8, 24)
    assert tl.num_iterations == 14


@pytest.mark.parametrize("frames, block_size, context", [(5, 4, 2), (1, 1, 0), (9, 8, 2), (3, 3, 3)])
def test_short_video_is_one_block_of_all_frames(frames, block_size, context):
    tl = BlockTimeline(frames, block_size, context, num_steps=4)
    assert tl.num_blocks == 1
    assert tl.block_range(0) == (0, frames)
    assert tl.window_range(0) == (0, frames)
    assert tl.num_iterations == 4
    assert [tl.active(i) for i in range(4)] == [[0]] * 4
    assert not any(tl.has_cache(0, i) for i in range(4))


@pytest.mark.parametrize("kwargs, name", [
    (dict(num_frames=0, block_size=4, context=0, num_steps=1), "num_frames"),
    (dict(num_frames=8, block_size=0, context=0, num_steps=1), "block_size"),
    (dict(num_frames=8, block_size=4, context=-1, num_steps=1), "context"),
    (dict(num_frames=8, block_size=4, context=5, num_steps=1), "context"),
    (dict(num_frames=8, block_size=4, context=2, num_steps=0), "num_steps"),
    (dict(num_frames=8.0, block_size=4, context=2, num_steps=1), "num_frames"),
])
def test_invalid_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        BlockTimeline(**kwargs)


def test_queries_outside_the_timeline_raise():
    tl = BlockTimeline(13, 4, 2, 3)
    with pytest.raises(ValueError):
        tl.block_len(2)
    with pytest.raises(ValueError):
        tl.active(tl.num_iterations)
    with pytest.raises(ValueError):
        tl.step(1, 0)  # block 1 enters at iteration 1
    with pytest.raises(ValueError):
        tl.has_cache(0, 3)  # block 0 left after iteration 2
    with pytest.raises(ValueError):
        tl.dependencies(1, 4)


@settings(max_examples=200, deadline=None)
@given(timelines())
def test_blocks_tile_the_video(tl):
    F, B, c = tl.num_frames, tl.block_size, tl.context
    K = tl.num_blocks
    assert K == max(1, (F - c) // B)
    assert tl.num_iterations == K + tl.num_steps - 1
    stop = 0
    for b in range(K):
        start, end = tl.block_range(b)
        assert start == stop == tl.block_start(b)
        assert end - start == tl.block_len(b)
        stop = end
    assert stop == F
    assert all(tl.block_len(b) == B for b in range(1, K))
    if F >= B + c:
        # Block 0 takes the rest: at least B + c frames, fewer than a further block's worth.
        assert B + c <= tl.block_len(0) < 2 * B + c
    else:
        assert K == 1 and tl.block_len(0) == F


@settings(max_examples=200, deadline=None)
@given(timelines())
def test_windows_are_context_then_own_frames(tl):
    assert tl.window_range(0) == tl.block_range(0)
    for b in range(1, tl.num_blocks):
        start, stop = tl.window_range(b)
        own_start, own_stop = tl.block_range(b)
        prev_start, prev_stop = tl.block_range(b - 1)
        assert stop == own_stop
        assert own_start - start == tl.context
        assert start >= prev_start and prev_stop == own_start  # context lies inside block b-1
        assert stop - start == tl.block_size + tl.context


@settings(max_examples=200, deadline=None)
@given(timelines())
def test_every_block_takes_every_step_once_entering_at_its_index(tl):
    steps = list(tl.block_steps())
    assert all(isinstance(bs, BlockStep) for bs in steps)
    assert len(steps) == tl.num_blocks * tl.num_steps
    for b in range(tl.num_blocks):
        mine = [bs for bs in steps if bs.block == b]
        assert [bs.step for bs in mine] == list(range(tl.num_steps))
        assert [bs.iteration for bs in mine] == [b + s for s in range(tl.num_steps)]
        assert all(tl.step(b, bs.iteration) == bs.step for bs in mine)


@settings(max_examples=200, deadline=None)
@given(timelines())
def test_sequential_order_is_iterations_ascending_newest_block_first(tl):
    steps = list(tl.block_steps())
    keys = [(bs.iteration, -bs.block) for bs in steps]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    for i in range(tl.num_iterations):
        expected = [b for b in range(tl.num_blocks) if 0 <= i - b < tl.num_steps]
        assert tl.active(i) == sorted(expected, reverse=True)
        assert [bs.block for bs in steps if bs.iteration == i] == tl.active(i)


@settings(max_examples=200, deadline=None)
@given(timelines())
def test_feature_cache_present_exactly_when_next_block_is_active(tl):
    for bs in tl.block_steps():
        b, i = bs.block, bs.iteration
        expected = tl.context > 0 and b + 1 < tl.num_blocks and b + 1 in tl.active(i)
        assert tl.has_cache(b, i) == expected
        if bs.step == 0 or b == tl.num_blocks - 1 or tl.context == 0:
            assert not tl.has_cache(b, i)


@settings(max_examples=200, deadline=None)
@given(timelines())
def test_dependencies_are_own_and_previous_block_at_previous_iteration(tl):
    order = {(bs.block, bs.iteration): n for n, bs in enumerate(tl.block_steps())}
    for bs in tl.block_steps():
        b, i = bs.block, bs.iteration
        expected = set()
        if bs.step > 0:
            expected.add((b, i - 1))
        if b > 0:
            expected.add((b - 1, i - 1))
        deps = tl.dependencies(b, i)
        assert set(deps) == expected and len(deps) == len(expected)
        # Every dependency is a real block-step that comes earlier in the sequential order.
        assert all(order[dep] < order[(b, i)] for dep in deps)


def test_dependencies_small_example():
    tl = BlockTimeline(13, 4, 2, 3)  # K = 2, T = 3
    assert tl.dependencies(0, 0) == []
    assert tl.dependencies(1, 1) == [(0, 0)]
    assert tl.dependencies(0, 1) == [(0, 0)]
    assert tl.dependencies(1, 3) == [(1, 2), (0, 2)]
