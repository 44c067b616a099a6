"""The DualParal pipeline schedule: one instruction stream per stage, derived from a BlockTimeline.

Pure: no tensors, no communication. The engine maps each instruction type to a method and carries it
out; tests and the planner's simulator check the streams without any rank.
"""

from collections import deque
from typing import Iterator

from deepspeed.runtime.pipe.schedule import PipeInstruction, PipeSchedule

from .timeline import BlockTimeline


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


class EmitBlock(DualParalInstruction):
    """Stage 0: block ``block`` has taken its last step and is final (decode it, write it out).

    Follows the :class:`SchedulerStep` of the block's final step.
    """

    def __init__(self, block: int):
        super().__init__(block=block)


class DualParalSchedule(PipeSchedule):
    """Instruction stream of one pipeline stage for the block-steps of ``timeline``.

    ``steps()`` yields one list of instructions per block-step, in the timeline's sequential order.
    Every dependency of a yielded step lies in an earlier step, so a barrier between steps cannot
    deadlock.
    """

    def __init__(self, timeline: BlockTimeline, stages: int, stage_id: int):
        if not isinstance(stages, int) or stages < 1:
            raise ValueError(f"stages must be an integer >= 1, got {stages!r}")
        if not isinstance(stage_id, int) or not 0 <= stage_id < stages:
            raise ValueError(f"stage_id must be an integer in [0, {stages}), got {stage_id!r}")
        super().__init__(micro_batches=timeline.num_blocks * timeline.num_steps, stages=stages,
                         stage_id=stage_id)
        self.timeline = timeline

    def num_pipe_buffers(self) -> int:
        """Two: a stage works on one block-step while the next one arrives."""
        return 2

    def steps(self) -> Iterator[list[PipeInstruction]]:
        """Yield this stage's instructions for each block-step, in sequential order."""
        if self.is_first_stage:
            yield from self._first_stage_steps()
            return
        for bs in self.timeline.block_steps():
            b, s = bs.block, bs.step
            send = SendPrediction(b, s) if self.is_last_stage else SendActivation(b, s)
            yield [RecvActivation(b, s), ForwardLayers(b, s), send]

    def _first_stage_steps(self) -> Iterator[list[PipeInstruction]]:
        timeline = self.timeline
        # Block-steps sent down the pipeline whose predictions are not applied yet, in send order;
        # predictions come back in this order.
        outstanding: deque[tuple[int, int]] = deque()
        num_block_steps = self.micro_batches
        for n, bs in enumerate(timeline.block_steps()):
            b, s = bs.block, bs.step
            cmds: list[PipeInstruction] = []
            if self.stages == 1:
                cmds += [LoadWindow(b, s), ForwardLayers(b, s)]
                cmds += self._apply_prediction(b, s)
            else:
                needed = {(db, di - db) for db, di in timeline.dependencies(b, bs.iteration)}
                # FIFO: to apply the last dependency, everything sent before it is received first.
                last_needed = max((k for k, x in enumerate(outstanding) if x in needed), default=-1)
                for _ in range(last_needed + 1):
                    cmds += self._apply_prediction(*outstanding.popleft())
                cmds += [LoadWindow(b, s), ForwardLayers(b, s), SendActivation(b, s)]
                outstanding.append((b, s))
                if n == num_block_steps - 1:
                    while outstanding:
                        cmds += self._apply_prediction(*outstanding.popleft())
            yield cmds

    def _apply_prediction(self, block: int, step: int) -> list[PipeInstruction]:
        cmds: list[PipeInstruction] = []
        if self.stages > 1:
            cmds.append(RecvPrediction(block, step))
        cmds.append(SchedulerStep(block, step))
        if step == self.timeline.num_steps - 1:
            cmds.append(EmitBlock(block))
        return cmds


def stage_streams(timeline: BlockTimeline, stages: int) -> list[list[PipeInstruction]]:
    """The flattened instruction stream of every stage, stage 0 first."""
    return [[cmd for cmds in DualParalSchedule(timeline, stages, stage_id).steps() for cmd in cmds]
            for stage_id in range(stages)]
