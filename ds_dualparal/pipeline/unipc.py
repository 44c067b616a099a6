"""UniPC multistep for Wan's flow-matching schedule, with a step that never waits for the GPU.

diffusers' `UniPCMultistepScheduler.step` works its coefficients out on every call from 0-dim tensors
copied to the device (a copy from pageable host memory waits for the stream), solves a small linear
system there (its check reads the result back) and looks its step index up among the timesteps:
about seven host synchronisations per step on the first stage, each one holding the host until the
GPU has caught up instead of letting it queue the next block-step's kernels. Here every coefficient
is worked out once, on the host in float64, from diffusers' own sigmas and settings; a step is a few
element-wise tensor operations with Python floats (and the sigma of the x0 prediction as diffusers
passes it, a float32 scalar tensor on the host). The algorithm is diffusers' (UniPC with the B(h)
variants, predicting x0; `tests/test_unipc.py` holds it to diffusers' step over whole trajectories).

With sigmas σ_0 > … > σ_T (flow matching: α = 1 − σ, λ = log α − log σ), at step k with sample x_k and
model output v_k:

    m_k = x_k − σ_k v_k                                   the x0 prediction
    x_k ← UniC(x_{k−1}, m_{k−1}, m_{k−2}, …; m_k)          corrector (k ≥ 1), from the previous step's sample
    x_{k+1} = UniP(x_k, m_k, m_{k−1}, …)                   predictor

and each of UniC and UniP is  a·x + b·m_0 + Σ_i c_i (m_i − m_0) [+ d (m_k − m_0)], whose coefficients
depend only on the sigmas, the orders and the step: those are what `_coefficients` precomputes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# The settings this step implements (Wan's); others are refused when the scheduler is made.
_REQUIRED = dict(prediction_type="flow_prediction", use_flow_sigmas=True, predict_x0=True, thresholding=False,
                 solver_p=None)


@dataclass(frozen=True)
class _Update:
    """x' = a·x + b·m_0 + Σ_i c[i−1]·(m_i − m_0) + d·(m_t − m_0), m_i the i-th x0 prediction before m_0."""

    a: float
    b: float
    c: tuple[float, ...]
    d: float | None = None  # the corrector's term in the newest prediction m_t


@np.errstate(divide="ignore", invalid="ignore")  # a final sigma of 0 (λ = +inf), or sigma_min twice: as diffusers
def _coefficients(sigmas: np.ndarray, to: int, at: int, order: int, bh1: bool, corrector: bool) -> _Update:
    """The update from sigma index `at` (m_0 its prediction, m_i that of index at − i) to index `to`, as
    diffusers' `multistep_uni_p_bh_update` (predictor) or `multistep_uni_c_bh_update` (corrector) computes it."""
    lambdas = np.log(1 - sigmas) - np.log(sigmas)
    alpha_t, sigma_t, sigma_0 = 1 - sigmas[to], sigmas[to], sigmas[at]
    h = lambdas[to] - lambdas[at]
    rks = [(lambdas[at - i] - lambdas[at]) / h for i in range(1, order)] + [1.0]
    hh = -h  # predicting x0
    h_phi_1 = np.expm1(hh)
    b_h = hh if bh1 else np.expm1(hh)
    big_r, rhs = [], []
    h_phi_k, factorial = h_phi_1 / hh - 1, 1
    for i in range(1, order + 1):
        big_r.append([rk ** (i - 1) for rk in rks])
        rhs.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    if corrector:  # diffusers' simplified order 1
        rhos = [0.5] if order == 1 else list(np.linalg.solve(np.array(big_r), np.array(rhs)))
    else:  # and order 2; order 1 has no history term
        rhos = [] if order == 1 else [0.5] if order == 2 else list(
            np.linalg.solve(np.array(big_r)[:-1, :-1], np.array(rhs)[:-1]))
    e = -alpha_t * b_h
    c = tuple(float(e * rho / rk) for rho, rk in zip(rhos[: order - 1], rks))
    return _Update(float(sigma_t / sigma_0), float(-alpha_t * h_phi_1), c, float(e * rhos[-1]) if corrector else None)


class UniPC:
    """One block's UniPC sampler, made from a configured diffusers `UniPCMultistepScheduler` (timesteps
    set): the same schedule and updates, its state its step count, x0 predictions and last sample.

    `step` takes diffusers' arguments and returns a 1-tuple, as diffusers' does with `return_dict=False`
    (the only way this engine calls it), so that a block steps this and diffusers' flow-match Euler
    alike; the timestep is not read: the step count says which step it is.
    """

    def __init__(self, scheduler):
        config = scheduler.config
        wrong = [f"{name}={config[name]!r}" for name, value in _REQUIRED.items() if config[name] != value]
        if wrong:
            raise ValueError(f"UniPC with {', '.join(wrong)} is not supported (this engine implements Wan's: "
                             + ", ".join(f"{name}={value!r}" for name, value in _REQUIRED.items()) + ")")
        self.timesteps = scheduler.timesteps
        sigmas = scheduler.sigmas.double().numpy()  # the float32 values diffusers steps with
        steps, solver_order = len(self.timesteps), config.solver_order
        orders = [min(solver_order, steps - k if config.lower_order_final else solver_order, k + 1)
                  for k in range(steps)]
        bh1 = config.solver_type == "bh1"
        # as diffusers multiplies the model output with it: a 0-dim float32 tensor on the host (no copy to
        # the device), which rounds to the model output's dtype first
        self._sigmas = scheduler.sigmas[:steps].clone()
        self._predictor = [_coefficients(sigmas, k + 1, k, orders[k], bh1, corrector=False) for k in range(steps)]
        # step k corrects the previous step's prediction with the order that step predicted with
        self._corrector = [None] + [
            None if k - 1 in config.disable_corrector else _coefficients(sigmas, k, k - 1, orders[k - 1], bh1, True)
            for k in range(1, steps)]
        self.steps_taken = 0
        self.model_outputs: list[torch.Tensor | None] = [None] * solver_order  # x0 predictions, newest last
        self.last_sample: torch.Tensor | None = None  # the sample the last predictor started from

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = False):
        k = self.steps_taken
        # diffusers' x0 prediction, in its dtypes: σ·v in the model output's, the difference in the sample's
        prediction = sample - self._sigmas[k] * model_output
        if self._corrector[k] is not None:
            sample = _apply(self._corrector[k], self.last_sample, self.model_outputs, prediction)
        self.model_outputs = self.model_outputs[1:] + [prediction]
        self.last_sample = sample
        self.steps_taken = k + 1
        return (_apply(self._predictor[k], sample, self.model_outputs),)


def _apply(update: _Update, x: torch.Tensor, history: list[torch.Tensor], newest: torch.Tensor | None = None):
    """`update` on sample `x` with the x0 predictions `history` (newest last, its m_0)."""
    m0 = history[-1]
    out = update.a * x + update.b * m0
    for i, c in enumerate(update.c, start=1):
        out = out + c * (history[-1 - i] - m0)
    if update.d is not None:
        out = out + update.d * (newest - m0)
    return out
