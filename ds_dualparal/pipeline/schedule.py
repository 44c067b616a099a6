"""The DualParal pipeline schedule: one instruction stream per stage, derived from a BlockTimeline.

Pure: no tensors, no communication. The engine maps each instruction type to a method and carries it
out; tests and the planner's simulator check the streams without any rank.
"""

from typing import Iterator

from deepspeed.runtime.pipe.schedule import PipeInstruction, PipeSchedule

from .timeline import BlockStep, BlockTimeline


class DualParalInstruction(PipeInstruction):
    """Base of our instructions: equal when type and arguments are, so streams compare as lists."""

    def __eq__(self, other):
        return type(self) is type(other) and self.kwargs == other.kwargs

    def __hash__(self):
        return hash((type(self), tuple(sorted(self.kwargs.items()))))


class BlockStepInstruction(DualParalInstruction):
    """An instruction about block-step (``block``, ``step``)."""

    def __init__(self, block: int, step: int):
        super().__init__(block=block, step=step)


class LoadWindow(BlockStepInstruction):
    """First stage: assemble the model input X of this block-step from the current latents.

    Roughly ``x = cat(latents[b-1][-c:], latents[b])``. The schedule places it after the
    :class:`SchedulerStep` of every dependency, and before any later update of block b-1.
    """


class RecvActivation(BlockStepInstruction):
    """Stages > 0: receive the hidden states of this block-step from stage - 1.

    Pairs with :class:`SendActivation` on the previous stage, in the same order.
    """


class ForwardLayers(BlockStepInstruction):
    """Run this stage's layers on the block-step's hidden states.

    The first stage starts with the patch embedding; the last stage ends with the head and the
    CFG combine, producing the prediction for the block's own frames.
    """


class SendActivation(BlockStepInstruction):
    """Stages < last: send the hidden states to stage + 1. Pairs with :class:`RecvActivation`.

    Non-blocking (the engine posts it and moves on): a rendezvous send would close a cycle with
    the last stage's :class:`SendPrediction`.
    """


class SendPrediction(BlockStepInstruction):
    """Last stage, when stages > 1: send the prediction to stage 0. Pairs with :class:`RecvPrediction`.

    Non-blocking like :class:`SendActivation`; stage 0 receives predictions in the order they were sent.
    """


class RecvPrediction(BlockStepInstruction):
    """Stage 0, when stages > 1: receive the prediction of this block-step from the last stage."""


class SchedulerStep(BlockStepInstruction):
    """Stage 0: ``latents[b] = schedulers[b].step(prediction, t[step], latents[b])``."""


class SaveCheckpoint(DualParalInstruction):
    """Stage 0, with checkpoints on: every block-step of iterations < ``iteration`` has had its
    :class:`SchedulerStep` and none of a later one has, so the latents and schedulers are the
    state to continue from ``iteration``. Follows the last update (and emit) of ``iteration - 1``.
    """

    def __init__(self, iteration: int):
        super().__init__(iteration=iteration)


class EmitBlock(DualParalInstruction):
    """Stage 0: block ``block`` has taken its last step and is final (decode it, write it out).

    Follows the :class:`SchedulerStep` of the block's final step.
    """

    def __init__(self, block: int):
        super().__init__(block=block)


def block_steps_from(timeline: BlockTimeline, start: int = 0) -> list[BlockStep]:
    """The block-steps of iterations ``>= start``, in sequential order: what a run resumed at ``start`` does."""
    return [bs for bs in timeline.block_steps() if bs.iteration >= start]


def tick_table(timeline: BlockTimeline, stages: int, start: int = 0) -> list[list[int]]:
    """``ticks[k][p]``: the tick in which stage p runs the k-th block-step of iterations ``>= start``.

    Lockstep pipeline: a stage runs at most one block-step per tick, in sequential order; stage p
    runs block-step k the tick after stage p-1 did; the first stage starts a block-step the tick
    after the last stage produced the prediction of each of its dependencies. Dependencies from
    before ``start`` are already in the latents a resumed run starts from.
    """
    order = block_steps_from(timeline, start)
    index = {(bs.block, bs.iteration): k for k, bs in enumerate(order)}
    ticks: list[list[int]] = []
    for k, bs in enumerate(order):
        ready = ticks[k - 1][0] + 1 if k else 0
        if stages > 1:
            for dep in timeline.dependencies(bs.block, bs.iteration):
                if dep in index:
                    ready = max(ready, ticks[index[dep]][stages - 1] + 1)
        row = [ready]
        for p in range(1, stages):
            row.append(max(row[p - 1], ticks[k - 1][p] if k else -1) + 1)
        ticks.append(row)
    return ticks


class DualParalSchedule(PipeSchedule):
    """Instruction stream of one pipeline stage for the block-steps of ``timeline``.

    ``steps()`` yields one list of instructions per tick of a lockstep pipeline, the same number of
    ticks on every stage: first the block-step this stage computes in the tick (if any), then the
    messages that cross its boundaries at the end of the tick -- its own output going out, and what
    its neighbour produced in the same tick coming in. Both ends of every message therefore sit in
    the same tick, so a barrier between ticks cannot deadlock and the engine can post a tick's
    sends and receives as one batch, in the same order on every rank (what NCCL needs).

    A run resumed from a checkpoint starts at iteration ``start``: the block-steps of earlier
    iterations are left out on every stage. With ``checkpoint_every`` N, the first stage gets a
    :class:`SaveCheckpoint` at each iteration that is a multiple of N.
    """

    def __init__(self, timeline: BlockTimeline, stages: int, stage_id: int, start: int = 0,
                 checkpoint_every: int | None = None):
        if not isinstance(stages, int) or stages < 1:
            raise ValueError(f"stages must be an integer >= 1, got {stages!r}")
        if not isinstance(stage_id, int) or not 0 <= stage_id < stages:
            raise ValueError(f"stage_id must be an integer in [0, {stages}), got {stage_id!r}")
        if not isinstance(start, int) or not 0 <= start < timeline.num_iterations:
            raise ValueError(f"start must be an iteration in [0, {timeline.num_iterations}), got {start!r}")
        if checkpoint_every is not None and (not isinstance(checkpoint_every, int) or checkpoint_every < 1):
            raise ValueError(f"checkpoint_every must be an integer >= 1 or None, got {checkpoint_every!r}")
        self.order = block_steps_from(timeline, start)
        super().__init__(micro_batches=len(self.order), stages=stages, stage_id=stage_id)
        self.timeline = timeline
        self.start = start
        self.checkpoint_every = checkpoint_every

    def num_pipe_buffers(self) -> int:
        """Two: a stage works on one block-step while the next one arrives."""
        return 2

    def steps(self) -> Iterator[list[PipeInstruction]]:
        """Yield this stage's instructions for each tick."""
        p, last = self.stage_id, self.stages - 1
        order = [(bs.block, bs.step) for bs in self.order]
        ticks = tick_table(self.timeline, self.stages, self.start)
        runs = {row[p]: k for k, row in enumerate(ticks)}
        # messages arriving at this stage at the end of a tick: from stage p-1, or the last stage's
        # predictions coming back to the first
        source = p - 1 if p > 0 else last
        arrivals = {row[source]: k for k, row in enumerate(ticks)} if self.stages > 1 else {}
        for tick in range(ticks[-1][last] + 1):
            cmds: list[PipeInstruction] = []
            if tick in runs:
                b, s = order[runs[tick]]
                if p == 0:
                    cmds.append(LoadWindow(b, s))
                cmds.append(ForwardLayers(b, s))
                if self.stages == 1:
                    cmds += self._apply_prediction(b, s)
                else:
                    cmds.append(SendPrediction(b, s) if p == last else SendActivation(b, s))
            if tick in arrivals:
                b, s = order[arrivals[tick]]
                if p == 0:
                    cmds.append(RecvPrediction(b, s))
                    cmds += self._apply_prediction(b, s)
                else:
                    cmds.append(RecvActivation(b, s))
            yield cmds

    def _apply_prediction(self, block: int, step: int) -> list[PipeInstruction]:
        # Predictions come back in sequential order, so after the update of an iteration's oldest
        # block (it runs last) every earlier block-step is applied and no later one is.
        cmds: list[PipeInstruction] = [SchedulerStep(block, step)]
        if step == self.timeline.num_steps - 1:
            cmds.append(EmitBlock(block))
        iteration = block + step
        following = iteration + 1
        if (self.checkpoint_every is not None and block == self.timeline.active(iteration)[-1]
                and following < self.timeline.num_iterations and following % self.checkpoint_every == 0):
            cmds.append(SaveCheckpoint(following))
        return cmds


def stage_streams(timeline: BlockTimeline, stages: int, start: int = 0,
                  checkpoint_every: int | None = None) -> list[list[PipeInstruction]]:
    """The flattened instruction stream of every stage, stage 0 first."""
    return [[cmd for cmds in DualParalSchedule(timeline, stages, stage_id, start, checkpoint_every).steps()
             for cmd in cmds]
            for stage_id in range(stages)]
