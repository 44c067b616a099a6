"""SIGTERM and SIGHUP end a run as Ctrl-C does, and a rank leaves when its launcher is gone.

What `timeout`, `kill`, a closed terminal and job schedulers send is SIGTERM or SIGHUP, whose default
action ends the process at once: no message, and the mp4's temporary left beside the output. Here both
raise `Terminated` (a KeyboardInterrupt, so every cleanup that Ctrl-C gets runs: `atomic_output`
removes the temporaries) and `cli.main` says it in one line, exit 128 + the signal's number.

Python runs a handler only when the main thread runs Python again; a rank blocked in a collective may
not for up to `comm_timeout_s`. The C-level handler writes the signal's number to a wakeup pipe at
once, though, so a small thread sees it and ends the process after `GRACE_S` if it is still there.

Under DeepSpeed's launcher (`deepspeed` -> a per-node `deepspeed.launcher.launch` -> the ranks), killing
the `deepspeed` command leaves the per-node launcher and the ranks running, writing outputs later. A
rank therefore watches its launcher and the launcher's parent, and terminates itself as above when
either is gone. ffmpeg needs no watch: it reads the frames from a pipe of its rank, which closes
when the rank ends, and it then stops (writing only the temporary, never the final name).
"""

from __future__ import annotations

import os
import signal
import threading
import time

GRACE_S = 5.0  # after SIGTERM/SIGHUP, time for the cleanup before the process is ended regardless
WATCH_S = 0.5  # how often a rank looks at its launcher
_LAUNCHER = b"deepspeed.launcher.launch"


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread like Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_installed = False


def _on_signal(signum, frame):
    raise Terminated(signum)


def install(grace_s: float = GRACE_S, watch_s: float = WATCH_S) -> None:
    """In the main thread, before the work starts; once per process (the threads stay)."""
    global _installed
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _on_signal)
    if _installed:
        return
    _installed = True
    read, write = os.pipe()
    os.set_blocking(write, False)
    signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    threading.Thread(target=_deadline, args=(read, grace_s), name="signal-deadline", daemon=True).start()
    launcher = launcher_pids()
    if launcher is not None:
        threading.Thread(target=_watch, args=(*launcher, watch_s), name="launcher-watch", daemon=True).start()


def _deadline(read: int, grace_s: float) -> None:
    """Ends the process `grace_s` after the first SIGTERM/SIGHUP (other signals' bytes are skipped)."""
    while True:
        data = os.read(read, 64)
        caught = [n for n in data if n in (signal.SIGTERM, signal.SIGHUP)]
        if caught:
            time.sleep(grace_s)
            os._exit(128 + caught[0])


def launcher_pids() -> tuple[int, int] | None:
    """(the per-node launcher, its parent) when this process is a rank started by DeepSpeed's launcher."""
    launcher = os.getppid()
    try:
        with open(f"/proc/{launcher}/cmdline", "rb") as f:
            if _LAUNCHER not in f.read():
                return None
    except OSError:
        return None
    parent = _parent_of(launcher)
    return None if parent is None else (launcher, parent)


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after its last ")"
    return int(stat[stat.rindex(b")") + 2 :].split()[1])


def _watch(launcher: int, parent: int, watch_s: float) -> None:
    while os.getppid() == launcher and _parent_of(launcher) == parent:
        time.sleep(watch_s)
    os.kill(os.getpid(), signal.SIGTERM)


def continue_siblings() -> None:
    """A rank that leaves after a failure wakes the other ranks of its launcher (SIGCONT): a stopped one
    (SIGSTOP, a debugger) would otherwise take the launcher's SIGTERM only when its 30 s grace ends in
    SIGKILL. Awake, it fails its own transfer with this rank, or takes the SIGTERM, at once."""
    launcher = launcher_pids()
    if launcher is None:
        return
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid() and _parent_of(int(entry)) == launcher[0]:
            try:
                os.kill(int(entry), signal.SIGCONT)
            except OSError:
                pass
