"""Where the command's wall time went: one line that rank 0 logs at the end of a run.

The run's parts follow one another, so a stopwatch with laps accounts for all of it: `lap(part)`
gives the time since the previous lap to `part`, and the first lap counts from the process's start
(the kernel's record of it, so the interpreter's own start and the first imports are in), hence the
parts add up to the total. Parts that recur (a batch's jobs) add up.
"""

from __future__ import annotations

import os
import time

# In the order of the run; a part shows only if the run had it.
PARTS = ("start-up", "checks", "loading", "encoding", "generation", "last decode", "summary")
# start-up     the process's start to main, the runtime's imports, the process group
# checks       flags, config, jobs, model folder and outputs checked, and agreed on by every rank
# loading      this rank's weights (and a checkpoint's state, when resuming)
# encoding     prompts, an image, a clip to continue
# generation   the denoising (the first blocks' compilation on CUDA included: it happens there)
# last decode  the blocks still being decoded when the denoising ends, the outputs finished
# summary      the closing summary, collected from every rank


def process_age() -> float:
    """Seconds since this process started, from /proc (0.0 where there is none)."""
    try:
        with open("/proc/self/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()  # after the command name, which may hold spaces
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime, in ticks since boot
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started)
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0


class Stopwatch:
    """Laps of one run, counted from the process's start."""

    def __init__(self):
        self._last = time.perf_counter() - process_age()
        self.seconds: dict[str, float] = {}

    def lap(self, part: str) -> None:
        assert part in PARTS, f"unknown part {part!r}"
        now = time.perf_counter()
        self.seconds[part] = self.seconds.get(part, 0.0) + now - self._last
        self._last = now

    def line(self) -> str:
        """`time: start-up 6.1 s, checks 0.2 s, ..., total 20.8 s`."""
        parts = [f"{part} {self.seconds[part]:.1f} s" for part in PARTS if part in self.seconds]
        return f"time: {', '.join(parts)}, total {sum(self.seconds.values()):.1f} s"


_current = Stopwatch()


def start() -> None:
    """A new stopwatch for this run, its time so far (the process's start to `cli.main`) as start-up;
    `lap` then advances it."""
    global _current
    _current = Stopwatch()
    _current.lap("start-up")


def lap(part: str) -> None:
    _current.lap(part)


def line() -> str:
    return _current.line()
