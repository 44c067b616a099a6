"""DualParalSchedule streams, checked in plain Python and by the planner's discrete-event simulator."""

import re
from collections import Counter
from pathlib import Path

import pytest
from deepspeed.runtime.pipe.schedule import PipeInstruction, PipeSchedule

from ds_dualparal.pipeline import planner
from ds_dualparal.pipeline.planner import (
    Costs,
    DeadlockError,
    ScheduleError,
    main,
    simulate,
)
from ds_dualparal.pipeline.schedule import (
    DualParalSchedule,
    EmitBlock,
    ForwardLayers,
    LoadWindow,
    RecvActivation,
    RecvPrediction,
    SchedulerStep,
    SendActivation,
    SendPrediction,
    stage_streams,
)
from ds_dualparal.pipeline.timeline import BlockTimeline

PACKAGE = Path(__file__).resolve().parent.parent / "ds_dualparal"


def make_timeline(blocks, steps, block_size=2, context=1):
    """A timeline of exactly ``blocks`` blocks whose windows all have block_size + context frames."""
    tl = BlockTimeline(blocks * block_size + context, block_size, context, steps)
    assert tl.num_blocks == blocks
    return tl


def unit_costs(stages):
    return Costs(layer_seconds=[1.0] * stages)


def keys(stream, kind):
    return [(cmd.block, cmd.step) for cmd in stream if type(cmd) is kind]


def check_streams(tl, stages):
    """Invariants every stage's stream must hold, checked without the simulator."""
    streams = stage_streams(tl, stages)
    order = [(bs.block, bs.step) for bs in tl.block_steps()]
    for stream in streams:
        assert keys(stream, ForwardLayers) == order
    for p in range(stages - 1):
        assert keys(streams[p], SendActivation) == keys(streams[p + 1], RecvActivation) == order
    first, last = streams[0], streams[-1]
    if stages > 1:
        assert keys(last, SendPrediction) == keys(first, RecvPrediction) == order
    assert keys(first, LoadWindow) == order
    assert sorted(keys(first, SchedulerStep)) == sorted(order)
    applied = set()
    for n, cmd in enumerate(first):
        if isinstance(cmd, SchedulerStep):
            applied.add((cmd.block, cmd.step))
        elif isinstance(cmd, LoadWindow):
            for b, i in tl.dependencies(cmd.block, cmd.block + cmd.step):
                assert (b, i - b) in applied, f"{cmd!r} before its dependency ({b}, {i - b})"
        elif isinstance(cmd, EmitBlock):
            assert first[n - 1] == SchedulerStep(cmd.block, tl.num_steps - 1)
    assert Counter(cmd.block for cmd in first if isinstance(cmd, EmitBlock)) == Counter(range(tl.num_blocks))
    return streams


@pytest.mark.parametrize("stages", range(1, 9))
def test_streams_pair_up_and_never_deadlock(stages):
    for blocks in range(1, 13):
        for steps in range(1, 7):
            tl = make_timeline(blocks, steps)
            check_streams(tl, stages)
            result = simulate(tl, stages, unit_costs(stages))
            num = blocks * steps
            assert result.matched_messages == (stages - 1) * num + (num if stages > 1 else 0)
            assert result.busy_seconds == pytest.approx([float(num)] * stages)
            # Dependencies hold in simulated time too: an update ends before a window that reads it.
            log0 = result.log[0]
            applied_at = {(c.block, c.step): end for _, end, c in log0 if isinstance(c, SchedulerStep)}
            for start, _, cmd in log0:
                if isinstance(cmd, LoadWindow):
                    for b, i in tl.dependencies(cmd.block, cmd.block + cmd.step):
                        assert applied_at[(b, i - b)] <= start


@pytest.mark.parametrize("stages", [1, 2, 3, 5, 8])
def test_ticks_are_lockstep_and_hold_both_ends_of_every_message(stages):
    """DeepSpeed's contract, a barrier between yielded steps cannot deadlock, made concrete: every
    stage yields the same ticks, each message is sent and received in the same tick (so a tick's
    transfers can be one batch on every rank), and a stage computes only on inputs that arrived in
    an earlier tick."""
    tl = make_timeline(blocks=5, steps=4)
    ticks = [list(DualParalSchedule(tl, stages, p).steps()) for p in range(stages)]
    assert len({len(t) for t in ticks}) == 1
    arrived = set()
    for n in range(len(ticks[0])):
        sent, received = set(), set()
        for p in range(stages):
            cmds = ticks[p][n]
            assert sum(isinstance(c, ForwardLayers) for c in cmds) <= 1
            for c in cmds:
                if isinstance(c, ForwardLayers) and p > 0:
                    assert (p, c.block, c.step) in arrived, f"stage {p} tick {n}: {c!r} before its input"
                if isinstance(c, SendActivation):
                    sent.add((p + 1, c.block, c.step))
                if isinstance(c, SendPrediction):
                    sent.add((0, c.block, c.step))
                if isinstance(c, (RecvActivation, RecvPrediction)):
                    received.add((p, c.block, c.step))
        assert sent == received, f"tick {n}: sent {sent} received {received}"
        arrived |= received


def test_first_stage_golden_stream_two_stages():
    tl = make_timeline(blocks=2, steps=2)
    assert stage_streams(tl, 2)[0] == [
        LoadWindow(0, 0), ForwardLayers(0, 0), SendActivation(0, 0),
        # (1, 0) reads block 0 after step 0
        RecvPrediction(0, 0), SchedulerStep(0, 0),
        LoadWindow(1, 0), ForwardLayers(1, 0), SendActivation(1, 0),
        LoadWindow(0, 1), ForwardLayers(0, 1), SendActivation(0, 1),
        # (1, 1) needs (1, 0) and (0, 1): the later-sent one drains both
        RecvPrediction(1, 0), SchedulerStep(1, 0),
        RecvPrediction(0, 1), SchedulerStep(0, 1), EmitBlock(0),
        LoadWindow(1, 1), ForwardLayers(1, 1), SendActivation(1, 1),
        RecvPrediction(1, 1), SchedulerStep(1, 1), EmitBlock(1),
    ]


def test_single_stage_stream_is_sequential():
    tl = make_timeline(blocks=3, steps=2)
    expected = []
    for bs in tl.block_steps():
        expected += [LoadWindow(bs.block, bs.step), ForwardLayers(bs.block, bs.step), SchedulerStep(bs.block, bs.step)]
        if bs.step == 1:
            expected.append(EmitBlock(bs.block))
    assert stage_streams(tl, 1) == [expected]


def test_middle_and_last_stage_streams():
    tl = make_timeline(blocks=2, steps=2)
    streams = stage_streams(tl, 3)
    order = [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert streams[1] == [cmd for b, s in order
                          for cmd in (RecvActivation(b, s), ForwardLayers(b, s), SendActivation(b, s))]
    assert streams[2] == [cmd for b, s in order
                          for cmd in (RecvActivation(b, s), ForwardLayers(b, s), SendPrediction(b, s))]


def test_schedule_is_a_deepspeed_pipe_schedule():
    tl = make_timeline(blocks=3, steps=4)
    sched = DualParalSchedule(tl, stages=4, stage_id=3)
    assert isinstance(sched, PipeSchedule)
    assert sched.micro_batches == 12 and sched.stages == 4 and sched.is_last_stage
    assert sched.num_pipe_buffers() == 2
    assert all(isinstance(cmd, PipeInstruction) for stream in stage_streams(tl, 4) for cmd in stream)
    for kind in (LoadWindow, RecvActivation, ForwardLayers, SendActivation, SendPrediction, RecvPrediction,
                 SchedulerStep):
        cmd = kind(block=2, step=1)
        assert (cmd.block, cmd.step) == (2, 1) and cmd.kwargs == {"block": 2, "step": 1} and kind.__doc__
    assert EmitBlock(block=2).kwargs == {"block": 2} and EmitBlock.__doc__
    assert LoadWindow(1, 2) != ForwardLayers(1, 2) and LoadWindow(1, 2) != LoadWindow(2, 1)


@pytest.mark.parametrize("stages, stage_id", [(0, 0), (2, 2), (2, -1)])
def test_schedule_rejects_bad_stages(stages, stage_id):
    with pytest.raises(ValueError):
        DualParalSchedule(make_timeline(2, 2), stages, stage_id)


def steady_state_window(tl, stages):
    """Block-steps of the iterations with at least stages + 1 active blocks (a contiguous run)."""
    return [(bs.block, bs.step) for bs in tl.block_steps() if len(tl.active(bs.iteration)) >= stages + 1]


def forward_gaps(result, stage, window):
    """Idle time on ``stage`` between consecutive ForwardLayers of the window's block-steps."""
    inside = set(window)
    spans = [(start, end) for start, end, cmd in result.log[stage]
             if isinstance(cmd, ForwardLayers) and (cmd.block, cmd.step) in inside]
    assert len(spans) == len(window)
    return [nxt[0] - prev[1] for prev, nxt in zip(spans, spans[1:])]


@pytest.mark.parametrize("stages", range(1, 7))
def test_no_bubble_with_stages_plus_one_active_blocks(stages):
    for blocks in range(stages + 1, stages + 4):
        for steps in (stages + 1, stages + 3):
            tl = make_timeline(blocks, steps)
            window = steady_state_window(tl, stages)
            assert len(window) > stages
            result = simulate(tl, stages, unit_costs(stages))
            for p in range(stages):
                assert forward_gaps(result, p, window) == [0.0] * (len(window) - 1), (stages, blocks, steps, p)


def test_fewer_active_blocks_than_stages_plus_one_leave_bubbles():
    stages = 4
    tl = make_timeline(blocks=stages, steps=10)  # at most 4 active blocks
    result = simulate(tl, stages, unit_costs(stages))
    middle = [(bs.block, bs.step) for bs in tl.block_steps() if len(tl.active(bs.iteration)) == stages]
    assert any(gap > 0 for gap in forward_gaps(result, 0, middle))


@pytest.mark.parametrize("stages", [2, 4, 8])
def test_bubble_fraction_drops_as_blocks_grow(stages):
    fractions = [simulate(make_timeline(blocks, 6), stages, unit_costs(stages)).bubble_fraction
                 for blocks in (1, 2, 4, 8, 12)]
    assert all(a > b for a, b in zip(fractions, fractions[1:])), fractions
    assert fractions[0] == pytest.approx(1 - 1 / stages)


def test_one_block_waits_for_the_whole_pipeline_every_step():
    stages, steps, send = 4, 5, 0.01
    tl = make_timeline(blocks=1, steps=steps)
    result = simulate(tl, stages, Costs([0.25] * stages, send_seconds=send))
    # Each step: all layers (1 s) plus stages - 1 activation hops and one prediction hop.
    assert result.total_seconds == pytest.approx(steps * (1.0 + stages * send))


def test_single_stage_time_is_the_sum_of_costs_and_windows_scale():
    tl = BlockTimeline(num_frames=13, block_size=4, context=2, num_steps=3)  # windows of 9 and 6 frames
    result = simulate(tl, 1, Costs([6.0], scheduler_seconds=0.5))
    assert result.total_seconds == pytest.approx(3 * (9.0 + 6.0) + 6 * 0.5)
    assert result.bubble_fraction == pytest.approx(0.0)


@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_overlap_is_never_slower_and_changes_nothing_on_one_stage(stages):
    """The engine's default: stage 0 applies a returned prediction only when a window, an emitted block
    or the end needs it. The simulator still checks every dependency; it can only gain time."""
    for tl in (BlockTimeline(48, 8, 8, 10), BlockTimeline(12, 2, 1, 4), BlockTimeline(40, 4, 2, 6)):
        for layer in ([1.0] * stages, [1.0] + [2.0] * (stages - 1), [2.0] + [1.0] * (stages - 1)):
            for send in (0.0, 0.3):
                costs = Costs(layer, send_seconds=send, scheduler_seconds=0.05)
                waiting = simulate(tl, stages, costs).total_seconds
                overlapped = simulate(tl, stages, costs, overlap=True).total_seconds
                assert overlapped <= waiting + 1e-9, (tl, layer, send)
                if stages == 1:
                    assert overlapped == pytest.approx(waiting)


def test_overlap_hides_the_prediction_hop():
    """Anchor-like queue (5 blocks, 10 steps) on 2 equal stages: with a transfer latency, waiting for each
    prediction where it is received puts the hop on the critical path every tick; overlap does not."""
    tl = BlockTimeline(48, 8, 8, 10)
    costs = Costs([1.0, 1.0], send_seconds=0.3)
    waiting = simulate(tl, 2, costs).total_seconds
    overlapped = simulate(tl, 2, costs, overlap=True).total_seconds
    no_latency = simulate(tl, 2, Costs([1.0, 1.0]), overlap=True).total_seconds
    assert overlapped < waiting - 10 * 0.3
    assert overlapped - no_latency < (waiting - no_latency) / 3  # 4.2 s of the hops left, of 15.6 s


def tamper(monkeypatch, edit):
    """Make the simulator run streams changed by ``edit(streams)``."""
    def edited(tl, stages):
        streams = stage_streams(tl, stages)
        edit(streams)
        return streams
    monkeypatch.setattr(planner, "stage_streams", edited)


def test_simulator_reports_out_of_order_messages(monkeypatch):
    def swap_first_receives(streams):
        stream = streams[1]
        a, b = [n for n, cmd in enumerate(stream) if isinstance(cmd, RecvActivation)][:2]
        stream[a], stream[b] = stream[b], stream[a]
    tamper(monkeypatch, swap_first_receives)
    with pytest.raises(ScheduleError, match=re.escape("RecvActivation(block=1, step=0)") + ".*"
                       + re.escape("SendActivation(block=0, step=0)")):
        simulate(make_timeline(2, 2), 2, unit_costs(2))


def test_simulator_reports_deadlock(monkeypatch):
    def receive_before_sending(streams):
        stream = streams[0]
        stream.insert(0, stream.pop(stream.index(RecvPrediction(0, 0))))
    tamper(monkeypatch, receive_before_sending)
    with pytest.raises(DeadlockError) as info:
        simulate(make_timeline(2, 2), 3, unit_costs(3))
    assert info.value.stuck == {0: RecvPrediction(0, 0), 1: RecvActivation(0, 0), 2: RecvActivation(0, 0)}


def test_simulator_reports_a_window_loaded_before_its_dependency(monkeypatch):
    def load_early(streams):
        stream = streams[0]
        recv = stream.index(RecvPrediction(0, 0))
        load = stream.index(LoadWindow(1, 0))
        stream[recv:load + 1] = stream[load:load + 1] + stream[recv:load]
    tamper(monkeypatch, load_early)
    message = "LoadWindow(block=1, step=0) before SchedulerStep(block=0, step=0)"
    with pytest.raises(ScheduleError, match=re.escape(message)):
        simulate(make_timeline(2, 2), 2, unit_costs(2))


def test_simulator_reports_an_update_before_the_next_block_read_the_old_frames(monkeypatch):
    def update_early(streams):
        # Run block-step (0, 1) before (1, 0) of the same iteration: block 1 would see block 0 updated.
        stream = streams[0]
        assert stream[3:9] == [LoadWindow(1, 0), ForwardLayers(1, 0), SchedulerStep(1, 0),
                               LoadWindow(0, 1), ForwardLayers(0, 1), SchedulerStep(0, 1)]
        stream[3:9] = stream[6:9] + stream[3:6]
    tamper(monkeypatch, update_early)
    message = "SchedulerStep(block=0, step=1) before LoadWindow(block=1, step=0)"
    with pytest.raises(ScheduleError, match=re.escape(message)):
        simulate(make_timeline(2, 3), 1, unit_costs(1))


def test_simulator_needs_one_cost_per_stage():
    with pytest.raises(ValueError, match="layer_seconds"):
        simulate(make_timeline(2, 2), 3, unit_costs(2))


def test_planner_cli_prints_latency_and_bubble(capsys):
    argv = ["--stages", "8", "--frames", "257", "--block-size", "8", "--context", "8", "--steps", "50",
            "--block-step-seconds", "0.6", "--send-seconds", "0.002"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    seconds = float(re.search(r"predicted seconds \(overlapped, as the engine runs\): ([0-9.]+)", out).group(1))
    bubble = float(re.search(r"bubble fraction: ([0-9.]+)", out).group(1))
    assert "block-steps/s" in out
    # 31 blocks x 50 steps of 0.6 s (block 0: 17/16 of that) over 8 stages, with a small ramp.
    one_device = 0.6 * (50 * 17 / 16 + 30 * 50)
    assert one_device / 8 < seconds < one_device / 8 * 1.1
    assert 0 < bubble < 0.1


@pytest.mark.parametrize("bad", [
    ["--stages", "0"],
    ["--context", "9"],
    ["--block-step-seconds", "0"],
    ["--send-seconds", "-1"],
    ["--frames", "many"],
])
def test_planner_cli_rejects_bad_arguments(bad, capsys):
    argv = dict(zip(["--stages", "--frames", "--block-size", "--context", "--steps", "--block-step-seconds"],
                    ["2", "48", "8", "8", "10", "0.6"]))
    argv.update(dict(zip(bad[::2], bad[1::2])))
    with pytest.raises(SystemExit) as info:
        main([part for item in argv.items() for part in item])
    assert info.value.code == 2
    assert bad[0] in capsys.readouterr().err


def test_planner_cli_requires_arguments():
    with pytest.raises(SystemExit) as info:
        main(["--stages", "2"])
    assert info.value.code == 2


@pytest.mark.parametrize("module", ["pipeline/timeline.py", "pipeline/schedule.py", "pipeline/planner.py",
                                    "pipeline/overlap.py"])
def test_module_imports_no_torch(module):
    source = (PACKAGE / module).read_text()
    assert not re.search(r"^\s*(import torch|from torch)\b", source, re.MULTILINE)
