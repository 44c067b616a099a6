"""Prompt schedules (docs/DESIGN.md §1, "Prompt schedules"): which text conditions each block.

Pure Python, no tensors: every rank computes the same plan from the config alone.

- A block takes the segment that holds its *middle* video frame: block b owns latent frames
  [s, e), i.e. video frames v0 = (0 if s == 0 else 4s − 3) to v1 = 4(e − 1), and its middle frame is
  (v0 + v1) // 2. A change of prompt therefore falls on the block boundary nearest to its frame.
- ``prompt_transition = n`` blends over n blocks around each change: block b's text is the mean of
  the segment texts of the n + 1 blocks b − ceil(n/2) … b + floor(n/2) (indices clamped to the
  video). Around an isolated change the n blocks nearest it get 1/(n+1), 2/(n+1), …, n/(n+1) of the
  new text; n = 0 is a cut. The weights depend only on block indices.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from ..config import TEMPORAL_FACTOR
from .timeline import BlockTimeline


def video_frames(timeline: BlockTimeline, block: int) -> tuple[int, int]:
    """First and last video frame of ``block``'s own latent frames (latent f covers 4f−3 … 4f, f ≥ 1)."""
    start, stop = timeline.block_range(block)
    first = 0 if start == 0 else TEMPORAL_FACTOR * start - (TEMPORAL_FACTOR - 1)
    return first, TEMPORAL_FACTOR * (stop - 1)


def block_segments(starts: list[int], timeline: BlockTimeline) -> list[int]:
    """Per block, the index of the segment (``starts``: their from_frame, ascending, the first 0) that
    holds the block's middle video frame."""
    segments = []
    for block in range(timeline.num_blocks):
        first, last = video_frames(timeline, block)
        middle = (first + last) // 2
        segments.append(max(i for i, start in enumerate(starts) if start <= middle))
    return segments


def block_mixes(segments: list[int], transition: int) -> list[tuple[tuple[int, Fraction], ...]]:
    """Per block, its (segment, weight) pairs: the mean over the window of ``transition + 1`` blocks
    around it (clamped to the video), in ascending segment order; weights sum to 1."""
    blocks = len(segments)
    before, after = (transition + 1) // 2, transition // 2
    mixes = []
    for block in range(blocks):
        window = [segments[min(max(b, 0), blocks - 1)] for b in range(block - before, block + after + 1)]
        mixes.append(tuple((s, Fraction(window.count(s), len(window))) for s in sorted(set(window))))
    return mixes


@dataclass(frozen=True)
class PromptPlan:
    """The texts of one generation and how each block mixes them.

    ``texts``: the distinct (prompt, negative prompt) pairs that some block uses, in order of first
    use; the embeddings travel as one tensor stacked in this order. ``mixes``: per block, (index into
    ``texts``, weight) pairs in ascending index, weights summing to 1 (one pair: the block's text as is).
    """

    texts: tuple[tuple[str, str], ...]
    mixes: tuple[tuple[tuple[int, float], ...], ...]
    unused: tuple[int, ...] = ()  # segments that no block uses (shorter than a block, no transition)


def prompt_plan(cfg, timeline: BlockTimeline | None = None) -> PromptPlan:
    """The prompt plan of ``cfg`` (its prompt schedule and prompt_transition) over its blocks."""
    if timeline is None:
        from .clip import job_timeline  # it reads the clip's length

        timeline = job_timeline(cfg)
    schedule = cfg.prompt_schedule
    segment_mixes = block_mixes(block_segments([start for start, _, _ in schedule], timeline), cfg.prompt_transition)
    texts: list[tuple[str, str]] = []
    mixes = []
    for mix in segment_mixes:
        pairs: dict[int, Fraction] = {}
        for segment, weight in mix:
            text = schedule[segment][1:]
            if text not in texts:
                texts.append(text)
            index = texts.index(text)
            pairs[index] = pairs.get(index, Fraction(0)) + weight  # two segments of the same text add up
        mixes.append(tuple((index, float(pairs[index])) for index in sorted(pairs)))
    used = {segment for mix in segment_mixes for segment, _ in mix}
    unused = tuple(s for s in range(len(schedule)) if s not in used)
    return PromptPlan(tuple(texts), tuple(mixes), unused)
