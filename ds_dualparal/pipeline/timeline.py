"""Which block performs which denoising step at which iteration (docs/DESIGN.md §1).

Pure Python: no tensors. The schedule, the planner and the engine all read the same timeline.
"""

from dataclasses import dataclass
from typing import Iterator


@dataclass(frozen=True)
class BlockStep:
    """Block ``block`` performing denoising step ``step`` at iteration ``iteration``."""

    iteration: int
    block: int
    step: int


def _require_int(name: str, value, low: int, high: int | None = None) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    if high is not None:
        ok = ok and value <= high
    if not ok:
        allowed = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


class BlockTimeline:
    """Block partition of ``num_frames`` latent frames and the iteration timeline of block-wise denoising.

    Blocks are contiguous frame ranges, block 0 first; blocks 1..K-1 hold ``block_size`` frames and
    block 0 the rest, so every window (``context`` frames of the previous block plus the block's own)
    has about ``block_size + context`` frames. Block b enters at iteration b and performs step
    ``s = i - b`` at iteration i while ``0 <= s < num_steps``.

    ``prefix`` latent frames (a clip being continued, docs/continue-a-clip.md) may come first: they
    are final before iteration 0 and belong to no block. The blocks tile frames ``prefix ..
    num_frames - 1``, and block 0's window starts with the prefix's last ``min(context, prefix)``
    frames, so block 0 is cut like the others: its window is about ``block_size + context`` frames.
    """

    def __init__(self, num_frames: int, block_size: int, context: int, num_steps: int, prefix: int = 0):
        _require_int("num_frames", num_frames, 1)
        _require_int("block_size", block_size, 1)
        _require_int("num_steps", num_steps, 1)
        _require_int("context", context, 0, block_size)
        _require_int("prefix", prefix, 0, num_frames - 1)
        self.num_frames = num_frames
        self.block_size = block_size
        self.context = context
        self.num_steps = num_steps
        self.prefix = prefix
        # frames of context block 0 would lack without a prefix: it makes them up with its own
        self.num_blocks = max(1, (num_frames - max(prefix, context)) // block_size)
        self.num_iterations = self.num_blocks + num_steps - 1

    def __repr__(self) -> str:
        return (f"BlockTimeline(num_frames={self.num_frames}, block_size={self.block_size}, "
                f"context={self.context}, num_steps={self.num_steps}, prefix={self.prefix})")

    def _check_block(self, b: int) -> None:
        if not 0 <= b < self.num_blocks:
            raise ValueError(f"block must be in [0, {self.num_blocks}), got {b}")

    def _check_block_step(self, b: int, i: int) -> None:
        self._check_block(b)
        if not 0 <= i - b < self.num_steps:
            raise ValueError(f"block {b} is not active at iteration {i} "
                             f"(it runs at iterations {b}..{b + self.num_steps - 1})")

    def block_len(self, b: int) -> int:
        """Number of latent frames owned by block ``b``."""
        self._check_block(b)
        if b == 0:
            return self.num_frames - self.prefix - (self.num_blocks - 1) * self.block_size
        return self.block_size

    def block_start(self, b: int) -> int:
        """First latent frame of block ``b`` (counted over the whole video, prefix included)."""
        self._check_block(b)
        if b == 0:
            return self.prefix
        return self.prefix + self.block_len(0) + (b - 1) * self.block_size

    def block_range(self, b: int) -> tuple[int, int]:
        """``[start, stop)`` latent frames owned by block ``b``."""
        start = self.block_start(b)
        return start, start + self.block_len(b)

    def window_range(self, b: int) -> tuple[int, int]:
        """``[start, stop)`` latent frames of the model input X of block ``b``.

        Block b > 0 sees the last ``context`` frames of block b-1 followed by its own frames;
        block 0 the last ``context_len(0)`` frames of the prefix (none without one), then its own.
        """
        start, stop = self.block_range(b)
        return start - self.context_len(b), stop

    def context_len(self, b: int) -> int:
        """Frames of context before block ``b``'s own in its window."""
        self._check_block(b)
        return min(self.context, self.prefix) if b == 0 else self.context

    def step(self, b: int, i: int) -> int:
        """Denoising step that block ``b`` performs at iteration ``i``."""
        self._check_block_step(b, i)
        return i - b

    def active(self, i: int) -> list[int]:
        """Blocks active at iteration ``i``, newest (highest index) first."""
        if not 0 <= i < self.num_iterations:
            raise ValueError(f"iteration must be in [0, {self.num_iterations}), got {i}")
        newest = min(i, self.num_blocks - 1)
        oldest = max(0, i - self.num_steps + 1)
        return list(range(newest, oldest - 1, -1))

    def has_cache(self, b: int, i: int) -> bool:
        """Whether block-step (b, i) attends to the feature cache of block b+1.

        Block b+1 runs before block b in the same iteration (newest first), so its cache exists
        exactly when it is active; it never is at step 0 of block b.
        """
        self._check_block_step(b, i)
        nxt = b + 1
        return self.context > 0 and nxt < self.num_blocks and 0 <= i - nxt < self.num_steps

    def block_steps(self) -> Iterator[BlockStep]:
        """All block-steps in sequential order: iterations ascending, newest block first within one."""
        for i in range(self.num_iterations):
            for b in self.active(i):
                yield BlockStep(iteration=i, block=b, step=i - b)

    def dependencies(self, b: int, i: int) -> list[tuple[int, int]]:
        """``(block, iteration)`` pairs whose scheduler updates block-step (b, i) reads.

        Its own latents come from (b, i-1); the context frames of block b-1 are read as they stand
        after iteration i-1. Block b-1 is one step ahead of block b, so it always ran at i-1.
        """
        self._check_block_step(b, i)
        deps = []
        if i - 1 >= b:
            deps.append((b, i - 1))
        if b >= 1:
            deps.append((b - 1, i - 1))
        return deps
