"""The one overlap policy (pipeline/overlap.py) that the engine and the simulator share, and the
simulator's and checkpoint's checks as real exceptions (they must survive `python -O`)."""

import ast
from pathlib import Path

from ds_dualparal.pipeline import engine, planner
from ds_dualparal.pipeline.overlap import DeferredUpdates

PACKAGE = Path(__file__).resolve().parents[1] / "ds_dualparal"


def test_lockstep_applies_every_step_at_once():
    updates = DeferredUpdates(overlap=False)
    assert updates.schedule((1, 0), returned=True) == [(1, 0)]
    assert updates.schedule((0, 1), returned=True) == [(0, 1)]
    assert len(updates) == 0


def test_overlap_defers_returned_steps_and_applies_them_in_order():
    updates = DeferredUpdates(overlap=True)
    for key in [(2, 0), (1, 1), (0, 2)]:
        assert updates.schedule(key, returned=True) == []
    assert updates.due(needed=[(1, 1)]) == [(2, 0), (1, 1)]  # up to the last needed, never past it
    assert updates.due(needed=[(5, 0)]) == []  # nothing pending is needed
    assert updates.due() == [(0, 2)]
    assert updates.due() == []


def test_a_step_that_never_left_the_stage_flushes_the_pending_ones_first():
    updates = DeferredUpdates(overlap=True)
    updates.schedule((1, 0), returned=True)
    assert updates.schedule((0, 1), returned=False) == [(1, 0), (0, 1)]


def test_engine_and_simulator_share_the_policy():
    assert engine.DeferredUpdates is planner.DeferredUpdates is DeferredUpdates


def _asserts(tree) -> list[int]:
    return [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Assert)]


def test_correctness_checks_are_exceptions_not_asserts():
    """`python -O` drops asserts: the simulator's, the overlap's and the checkpoint's checks must raise."""
    for module in ("pipeline/planner.py", "pipeline/overlap.py", "output/checkpoint.py"):
        assert _asserts(ast.parse((PACKAGE / module).read_text())) == [], module
    denoise = ast.parse((PACKAGE / "pipeline" / "denoise.py").read_text())
    [state] = [f for f in ast.walk(denoise) if isinstance(f, ast.FunctionDef) and f.name == "scheduler_state"]
    assert _asserts(state) == []
