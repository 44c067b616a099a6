"""When the first stage applies a scheduler step: the one overlap policy of the engine and the simulator.

A `SchedulerStep` whose prediction came back from the last stage may wait (overlap): stage 0 goes on
computing and applies the step only when something needs the block's new latents — a window it loads
(the steps that window depends on, and every earlier pending one), a block it emits, a checkpoint, or
the end (all pending steps). Steps are always applied in the schedule's order, so each block's
updates run in the same order as in lockstep, where every step is applied at once. A step whose
prediction never left the stage (one stage) is applied at once, after the pending ones.
"""

from __future__ import annotations

from collections import deque

Key = tuple[int, int]  # (block, step)


class DeferredUpdates:
    """Stage 0's scheduler steps not yet applied, in schedule order; pure bookkeeping, no tensors."""

    def __init__(self, overlap: bool):
        self.overlap = overlap
        self._pending: deque[Key] = deque()

    def schedule(self, key: Key, returned: bool) -> list[Key]:
        """The schedule's `SchedulerStep` for `key`, whose prediction `returned` from another stage or
        not: the steps to apply now, in order (none while it may wait)."""
        self._pending.append(key)
        if self.overlap and returned:
            return []
        return self.due()

    def due(self, needed: list[Key] | None = None) -> list[Key]:
        """The pending steps to apply now, in order: all of them, or up to the last of `needed`."""
        out = []
        while self._pending and (needed is None or any(key in self._pending for key in needed)):
            out.append(self._pending.popleft())
        return out

    def __len__(self) -> int:
        return len(self._pending)
