"""Discrete-event simulation of the DualParal schedule, and a latency planner on top of it.

The simulator runs every stage's instruction stream (``stage_streams``) against per-instruction
costs, pairs every send with its receive in FIFO order, and checks the dataflow the engine relies
on. ``python -m ds_dualparal.pipeline.planner --help`` predicts the latency of a configuration.
"""

import argparse
import math
from collections import deque
from dataclasses import dataclass, field

from ..report import stdout_report
from .overlap import DeferredUpdates
from .schedule import (
    EmitBlock,
    ForwardLayers,
    LoadWindow,
    RecvActivation,
    RecvPrediction,
    SchedulerStep,
    SendActivation,
    SendPrediction,
    block_steps_from,
    stage_streams,
    tick_table,
)
from .timeline import BlockTimeline


@dataclass
class Costs:
    """Seconds each instruction takes.

    ``layer_seconds[p]`` is stage p's ForwardLayers time for a window of ``block_size + context``
    frames; other windows scale linearly with their frame count.
    """

    layer_seconds: list[float]
    send_seconds: float = 0.0
    scheduler_seconds: float = 0.0
    tick_seconds: float = 0.0  # fixed cost of each tick (lockstep) or block-step (overlap): launches, set-up


@dataclass
class SimResult:
    """Outcome of :func:`simulate`; ``log[p]`` holds stage p's ``(start, end, instruction)`` in order."""

    total_seconds: float
    busy_seconds: list[float]
    bubble_fraction: float
    matched_messages: int
    log: list[list[tuple]] = field(repr=False)


class ScheduleError(RuntimeError):
    """The streams break the dataflow the engine relies on (a message unmatched or out of order, an
    instruction on the wrong stage or before its input, an update out of order)."""


class DeadlockError(ScheduleError):
    """No stage can make progress; ``stuck`` maps each unfinished stage to its blocked instruction."""

    def __init__(self, stuck: dict):
        self.stuck = stuck
        detail = ", ".join(f"stage {p}: {cmd!r}" for p, cmd in sorted(stuck.items()))
        super().__init__(f"deadlock: {detail}")


class _Stage:
    def __init__(self, stream):
        self.stream = stream
        self.pc = 0
        self.clock = 0.0
        self.busy = 0.0
        self.log = []
        # Block-steps whose input X / hidden states are present and not yet run through the layers.
        self.inputs = set()
        # Block-steps run through the layers whose result is not yet sent.
        self.outputs = set()

    @property
    def done(self) -> bool:
        return self.pc == len(self.stream)


class _Simulation:
    """State of one simulation; each ``_run_*`` method returns False when the instruction must wait."""

    def __init__(self, timeline: BlockTimeline, stages: int, costs: Costs, overlap: bool = False):
        self.timeline = timeline
        self.stages = stages
        self.costs = costs
        self.overlap = overlap
        # overlap: stage 0's returned predictions, (block, step) -> arrival, applied only when needed
        self.arrivals: dict[tuple[int, int], float] = {}
        self.pending = DeferredUpdates(overlap)
        self.reference_frames = timeline.block_size + timeline.context
        self.state = [_Stage(stream) for stream in stage_streams(timeline, stages)]
        self.channels: dict[tuple[int, int, str], deque] = {}
        self.matched = 0
        # Stage-0 bookkeeping, as (block, step): windows loaded, predictions at hand, updates applied.
        self.loaded = set()
        self.predictions = set()
        self.applied = set()
        self.emitted = set()
        self._handlers = {
            LoadWindow: self._run_load_window,
            ForwardLayers: self._run_forward_layers,
            SendActivation: self._run_send,
            SendPrediction: self._run_send,
            RecvActivation: self._run_recv,
            RecvPrediction: self._run_recv,
            SchedulerStep: self._run_scheduler_step,
            EmitBlock: self._run_emit_block,
        }

    def run(self) -> SimResult:
        while not all(st.done for st in self.state):
            progressed = False
            for p, st in enumerate(self.state):
                while not st.done and self._execute(p, st, st.stream[st.pc]):
                    st.pc += 1
                    progressed = True
            if not progressed:
                raise DeadlockError({p: st.stream[st.pc] for p, st in enumerate(self.state) if not st.done})
        self._apply_pending(self.state[0])
        leftover = {key: list(queue) for key, queue in self.channels.items() if queue}
        if leftover:
            raise ScheduleError(f"messages sent but never received: {leftover}")
        total = max(st.clock for st in self.state)
        busy = [st.busy for st in self.state]
        bubble = 1.0 - sum(busy) / (self.stages * total) if total > 0 else 0.0
        return SimResult(total_seconds=total, busy_seconds=busy, bubble_fraction=bubble,
                         matched_messages=self.matched, log=[st.log for st in self.state])

    def _execute(self, p: int, st: _Stage, cmd) -> bool:
        handler = self._handlers.get(type(cmd))
        if handler is None:
            raise ScheduleError(f"stage {p}: unknown instruction {cmd!r}")
        return handler(p, st, cmd)

    def _advance(self, st: _Stage, cmd, seconds: float, busy: bool) -> None:
        start, st.clock = st.clock, st.clock + seconds
        if busy:
            st.busy += seconds
        st.log.append((start, st.clock, cmd))

    def _channel(self, cmd, p: int) -> tuple[int, int, str]:
        """``(source, destination, kind)`` of the message that ``cmd`` on stage ``p`` sends or receives."""
        last = self.stages - 1
        if isinstance(cmd, SendActivation):
            if p >= last:
                raise ScheduleError(f"stage {p}: {cmd!r} on the last stage")
            return p, p + 1, "activation"
        if isinstance(cmd, RecvActivation):
            if p == 0:
                raise ScheduleError(f"stage {p}: {cmd!r} on stage 0")
            return p - 1, p, "activation"
        if isinstance(cmd, SendPrediction):
            if not p == last > 0:
                raise ScheduleError(f"stage {p}: {cmd!r} outside the last stage of a pipeline")
            return last, 0, "prediction"
        if not (isinstance(cmd, RecvPrediction) and p == 0 < last):
            raise ScheduleError(f"stage {p}: {cmd!r} outside stage 0 of a pipeline")
        return last, 0, "prediction"

    def _run_load_window(self, p, st, cmd) -> bool:
        b, s = cmd.block, cmd.step
        if p != 0:
            raise ScheduleError(f"stage {p}: {cmd!r} outside stage 0")
        self._apply_pending(st, [(db, di - db) for db, di in self.timeline.dependencies(b, b + s)])
        for db, di in self.timeline.dependencies(b, b + s):
            if (db, di - db) not in self.applied:
                raise ScheduleError(f"{cmd!r} before SchedulerStep(block={db}, step={di - db}) it depends on")
        self.loaded.add((b, s))
        st.inputs.add((b, s))
        self._advance(st, cmd, 0.0, busy=False)
        return True

    def _run_forward_layers(self, p, st, cmd) -> bool:
        key = (cmd.block, cmd.step)
        if key not in st.inputs:
            raise ScheduleError(f"stage {p}: {cmd!r} without its input")
        st.inputs.remove(key)
        if p == 0 and self.stages == 1:
            self.predictions.add(key)
        else:
            st.outputs.add(key)
        start, stop = self.timeline.window_range(cmd.block)
        seconds = self.costs.layer_seconds[p] * (stop - start) / self.reference_frames
        self._advance(st, cmd, seconds, busy=True)
        self._advance(st, "fixed", self.costs.tick_seconds, busy=False)
        return True

    def _run_send(self, p, st, cmd) -> bool:
        key = (cmd.block, cmd.step)
        if key not in st.outputs:
            raise ScheduleError(f"stage {p}: {cmd!r} before ForwardLayers")
        st.outputs.remove(key)
        self._advance(st, cmd, 0.0, busy=False)
        arrival = st.clock + self.costs.send_seconds
        self.channels.setdefault(self._channel(cmd, p), deque()).append((key, arrival, cmd))
        return True

    def _run_recv(self, p, st, cmd) -> bool:
        queue = self.channels.get(self._channel(cmd, p))
        if not queue:
            return False
        key, arrival, sent = queue.popleft()
        if key != (cmd.block, cmd.step):
            raise ScheduleError(f"stage {p}: {cmd!r} received the message of {sent!r}")
        self.matched += 1
        if isinstance(cmd, RecvPrediction):
            self.predictions.add(key)
            if self.overlap:  # the stage goes on; the update that uses it waits
                self.arrivals[key] = arrival
                self._advance(st, cmd, 0.0, busy=False)
                return True
        else:
            st.inputs.add(key)
        self._advance(st, cmd, max(0.0, arrival - st.clock), busy=False)
        return True

    def _run_scheduler_step(self, p, st, cmd) -> bool:
        if p != 0:
            raise ScheduleError(f"stage {p}: {cmd!r} outside stage 0")
        key = (cmd.block, cmd.step)
        self._apply_keys(st, self.pending.schedule(key, returned=key in self.arrivals))
        return True

    def _apply_pending(self, st: _Stage, needed: list[tuple[int, int]] | None = None) -> None:
        """Overlap: applies stage 0's deferred updates in order, all or until `needed` are, each once
        its prediction has arrived (as the engine does before a window, an emit and at the end)."""
        self._apply_keys(st, self.pending.due(needed))

    def _apply_keys(self, st: _Stage, keys: list[tuple[int, int]]) -> None:
        for key in keys:
            if key in self.arrivals:
                self._advance(st, "wait", max(0.0, self.arrivals.pop(key) - st.clock), busy=False)
            self._apply(st, SchedulerStep(*key))

    def _apply(self, st: _Stage, cmd) -> None:
        b, s = cmd.block, cmd.step
        if (b, s) not in self.predictions:
            raise ScheduleError(f"{cmd!r} without its prediction")
        if s > 0 and (b, s - 1) not in self.applied:
            raise ScheduleError(f"{cmd!r} out of step order")
        self.predictions.remove((b, s))
        # Block b+1 reads block b's context frames as they stood before this update.
        i, nxt = b + s, b + 1
        if self.timeline.context > 0 and nxt < self.timeline.num_blocks and 0 <= i - nxt < self.timeline.num_steps:
            if (nxt, i - nxt) not in self.loaded:
                raise ScheduleError(f"{cmd!r} before LoadWindow(block={nxt}, step={i - nxt}) read the old frames")
        self.applied.add((b, s))
        self._advance(st, cmd, self.costs.scheduler_seconds, busy=True)

    def _run_emit_block(self, p, st, cmd) -> bool:
        if p != 0:
            raise ScheduleError(f"stage {p}: {cmd!r} outside stage 0")
        self._apply_pending(st)
        last_step = self.timeline.num_steps - 1
        if (cmd.block, last_step) not in self.applied:
            raise ScheduleError(f"{cmd!r} before its final SchedulerStep")
        if cmd.block in self.emitted:
            raise ScheduleError(f"{cmd!r} emitted twice")
        self.emitted.add(cmd.block)
        self._advance(st, cmd, 0.0, busy=False)
        return True


def simulate(timeline: BlockTimeline, stages: int, costs: Costs, overlap: bool = False) -> SimResult:
    """Run all stages' instruction streams with ``costs``; raise DeadlockError if they get stuck.

    Sends are non-blocking and their message arrives ``send_seconds`` later; a receive waits for
    it. Messages must match their receives in FIFO order per (source, destination, kind).
    ``overlap``: as the engine runs by default (`GenerationRequest.overlap`): stage 0 does not wait
    for a returned prediction where the schedule receives it, only where an update needs it (the
    window of a block-step that depends on it, an emitted block, the end). Every block-step costs
    ``tick_seconds`` more on its stage, not counted as busy.
    """
    if len(costs.layer_seconds) != stages:
        raise ValueError(f"costs.layer_seconds needs one entry per stage ({stages}), "
                         f"got {len(costs.layer_seconds)}")
    return _Simulation(timeline, stages, costs, overlap).run()


def simulate_ticks(timeline: BlockTimeline, stages: int, costs: Costs) -> SimResult:
    """The lockstep pipeline as the engine runs it: each tick lasts as long as its slowest stage's
    block-step (stage 0 also applies the predictions that arrive), plus the tick's transfer and fixed
    cost, and no stage starts the next tick before every stage has finished this one.

    `simulate` gives the ideal of the same schedule (each stage waits only for its own inputs);
    the difference is the price of lockstep.
    """
    if len(costs.layer_seconds) != stages:
        raise ValueError(f"costs.layer_seconds needs one entry per stage ({stages}), "
                         f"got {len(costs.layer_seconds)}")
    order = block_steps_from(timeline)
    ticks = tick_table(timeline, stages)
    reference = timeline.block_size + timeline.context
    work = [[0.0] * stages for _ in range(ticks[-1][-1] + 1)]
    busy = [0.0] * stages
    for k, row in enumerate(ticks):
        start, stop = timeline.window_range(order[k].block)
        for p, tick in enumerate(row):
            seconds = costs.layer_seconds[p] * (stop - start) / reference
            work[tick][p] += seconds
            busy[p] += seconds
        work[row[-1]][0] += costs.scheduler_seconds  # the prediction is applied in the tick it arrives
    transfer = costs.send_seconds if stages > 1 else 0.0
    total = sum(max(stage_work) + transfer + costs.tick_seconds for stage_work in work)
    bubble = 1.0 - sum(busy) / (stages * total) if total > 0 else 0.0
    return SimResult(total_seconds=total, busy_seconds=busy, bubble_fraction=bubble, matched_messages=0, log=[])


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


MAX_SIMULATED = 200_000  # block-steps x stages: seconds to simulate; far beyond any real configuration


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ds_dualparal.pipeline.planner",
        description="Predict the latency of DualParal generation on a pipeline of N stages.")
    parser.add_argument("--stages", type=_positive_int, required=True, help="pipeline stages (GPUs)")
    parser.add_argument("--frames", type=_positive_int, required=True, help="latent frames F")
    parser.add_argument("--block-size", type=_positive_int, required=True, help="block size B in latent frames")
    parser.add_argument("--context", type=_non_negative_int, required=True, help="context frames c, 0..B")
    parser.add_argument("--steps", type=_positive_int, required=True, help="denoising steps T")
    parser.add_argument("--block-step-seconds", type=_positive_float, required=True,
                        help="seconds of one block-step (all layers, B + c frames) on one device")
    parser.add_argument("--send-seconds", type=_non_negative_float, default=0.0,
                        help="latency of one activation transfer between stages")
    parser.add_argument("--scheduler-seconds", type=_non_negative_float, default=0.0,
                        help="seconds of one scheduler step on stage 0")
    parser.add_argument("--tick-seconds", type=_non_negative_float, default=0.0,
                        help="fixed cost of each block-step on its stage (of each tick in lockstep)")
    return parser


def main(argv=None) -> int:
    """Print the predicted latency, throughput and bubble fraction of a configuration."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.context > args.block_size:
        parser.error(f"--context must be in [0, --block-size={args.block_size}], got {args.context}")
    timeline = BlockTimeline(args.frames, args.block_size, args.context, args.steps)
    work = timeline.num_blocks * timeline.num_steps * args.stages
    if work > MAX_SIMULATED:  # the simulation keeps every instruction of every stage
        parser.error(f"--frames/--block-size/--steps/--stages: {timeline.num_blocks} blocks x {timeline.num_steps} "
                     f"steps x {args.stages} stages = {work} block-steps to simulate, more than {MAX_SIMULATED}")
    costs = Costs(layer_seconds=[args.block_step_seconds / args.stages] * args.stages,
                  send_seconds=args.send_seconds, scheduler_seconds=args.scheduler_seconds,
                  tick_seconds=args.tick_seconds)
    result = simulate(timeline, args.stages, costs, overlap=True)
    lockstep = simulate_ticks(timeline, args.stages, costs)
    one_device = simulate(timeline, 1, Costs([args.block_step_seconds], 0.0, args.scheduler_seconds,
                                             args.tick_seconds), overlap=True)
    block_steps = timeline.num_blocks * timeline.num_steps
    report = stdout_report("ds_dualparal.pipeline.planner.report")
    report.info("blocks: %d (block 0: %d frames), block-steps: %d, iterations: %d", timeline.num_blocks,
                timeline.block_len(0), block_steps, timeline.num_iterations)
    report.info("predicted seconds (overlapped, as the engine runs): %.3f (1 device: %.3f, speedup %.2fx)",
                result.total_seconds, one_device.total_seconds, one_device.total_seconds / result.total_seconds)
    report.info("in lockstep ticks (overlap off): %.3f", lockstep.total_seconds)
    report.info("block-steps/s: %.3f", block_steps / result.total_seconds)
    report.info("bubble fraction: %.4f", result.bubble_fraction)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
