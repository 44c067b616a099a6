"""The result lines of the package's small command-line entry points (`python -m ds_dualparal.pipeline.planner`,
`python -m ds_dualparal.toy.tiny`): a logger whose records go, as bare lines, to standard output."""

from __future__ import annotations

import logging
import sys


def stdout_report(name: str) -> logging.Logger:
    """A logger `name` that writes each INFO message as one line to the current `sys.stdout` (the
    command's result, for users and scripts to read), and does not pass it on to the root logger."""
    logger = logging.getLogger(name)
    logger.handlers.clear()  # a second call (tests run a main several times) writes to the new stdout
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger
