"""The engine's UniPC step (pipeline/unipc.py) against diffusers' over whole trajectories, the settings it
refuses, and a step that makes no host round trip."""

import pytest
import torch
from diffusers import UniPCMultistepScheduler

from ds_dualparal.pipeline.denoise import block_scheduler, make_scheduler
from ds_dualparal.pipeline.unipc import UniPC
from ds_dualparal.wan.weights import TINY_WAN_PATH

# the tiny model's scheduler_config.json is Wan's (solver_order 2, bh2, lower_order_final, final sigma 0)
WAN = make_scheduler("unipc", 3.0, 50, TINY_WAN_PATH / "scheduler").config


def diffusers_unipc(steps, **changes):
    scheduler = UniPCMultistepScheduler.from_config({**WAN, **changes})
    scheduler.set_timesteps(steps)
    return scheduler


def trajectories(scheduler, dtype=torch.float32, seed=0):
    """Both steps from the same noise with the same model outputs; the largest difference relative to
    diffusers' sample, over every step, by norm and by largest element."""
    ours = UniPC(scheduler)
    generator = torch.Generator().manual_seed(seed)
    theirs = torch.randn(1, 16, 3, 8, 8, generator=generator)
    mine = theirs.clone()
    by_norm = by_element = 0.0
    for t in scheduler.timesteps:
        output = torch.randn(theirs.shape, generator=generator).to(dtype)
        theirs = scheduler.step(output, t, theirs, return_dict=False)[0]
        mine = ours.step(output, t, mine, return_dict=False)[0]
        assert mine.dtype == theirs.dtype == torch.float32
        by_norm = max(by_norm, float((mine - theirs).norm() / theirs.norm()))
        by_element = max(by_element, float((mine - theirs).abs().max() / theirs.abs().max()))
    return by_norm, by_element


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 10, 50])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wans_unipc_follows_diffusers_step_over_a_whole_trajectory(steps, dtype):
    """fp32 latents, model outputs in fp32 or (as on a GPU) bf16; diffusers works its coefficients out in
    float32 on every step, the engine in float64 once: ~1e-6 apart after 50 steps."""
    for seed in range(3):
        by_norm, by_element = trajectories(diffusers_unipc(steps), dtype, seed)
        assert by_norm <= 1e-6 and by_element <= 2e-6, (seed, by_norm, by_element)
        if steps <= 2:  # one order-1 predictor, one corrector: the same operations
            assert by_norm == 0


@pytest.mark.parametrize("changes, bound", [
    (dict(solver_type="bh1", final_sigmas_type="sigma_min"), 2e-6),
    (dict(disable_corrector=[0, 3]), 2e-6),
    (dict(lower_order_final=False, final_sigmas_type="sigma_min"), 2e-6),
    (dict(solver_order=1), 2e-6),
    (dict(solver_order=3), 3e-5),  # diffusers solves the order-3 systems in float32, the engine in float64
])
def test_other_unipc_settings_follow_diffusers_too(changes, bound):
    by_norm, by_element = trajectories(diffusers_unipc(50, **changes))
    assert by_element <= bound, (by_norm, by_element)


@pytest.mark.parametrize("changes", [dict(prediction_type="v_prediction"),
                                     dict(thresholding=True), dict(predict_x0=False)])
def test_settings_it_does_not_implement_are_refused(changes):
    with pytest.raises(ValueError, match="is not supported .this engine implements Wan's"):
        block_scheduler(diffusers_unipc(4, **changes))


def test_a_step_makes_no_host_round_trip(monkeypatch):
    """On CPU, a stand-in for `launch/check_syncs.py`: a step reads no tensor's value on the host, makes
    no tensor from host values, moves none and solves nothing; diffusers' step does."""
    scheduler = make_scheduler("unipc", 3.0, 10, TINY_WAN_PATH / "scheduler")
    ours, theirs = block_scheduler(scheduler), scheduler
    x = torch.randn(1, 4, 2, 4, 4)
    outputs = [torch.randn_like(x).bfloat16() for _ in scheduler.timesteps]
    calls = []

    def forbidden(name, original):
        def call(*args, **kwargs):
            calls.append(name)
            return original(*args, **kwargs)
        return call

    for owner, name in [(torch.Tensor, "item"), (torch.Tensor, "tolist"), (torch.Tensor, "nonzero"),
                        (torch.Tensor, "to"), (torch.Tensor, "__bool__"), (torch, "tensor"), (torch, "ones"),
                        (torch.linalg, "solve")]:
        monkeypatch.setattr(owner, name, forbidden(name, getattr(owner, name)))
    mine = x
    for t, output in zip(scheduler.timesteps, outputs):
        mine = ours.step(output, t, mine, return_dict=False)[0]
    assert calls == []
    theirs.step(outputs[0], scheduler.timesteps[0], x, return_dict=False)
    theirs.step(outputs[1], scheduler.timesteps[1], x, return_dict=False)
    assert {"nonzero", "item", "to", "ones"} <= set(calls)


def test_check_syncs_runs_where_there_is_cuda_and_says_so_where_there_is_none(capsys):
    from conftest import launch_script

    script = launch_script("check_syncs.py")
    assert script.main(["--steps", "4", "--frames", "6", "--block-size", "2", "--context", "1"]) == 0
    if not torch.cuda.is_available():
        assert capsys.readouterr().out == "check_syncs: needs a CUDA device; nothing checked\n"
