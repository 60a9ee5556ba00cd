"""Samplers against ideal denoisers: data N(mu, c^2) per element (c = 0: one known point), whose ideal
prediction has a closed form for each objective. The denoiser reads the noise level from the timestep it is
given (through the training schedule), so a sampler that feeds the wrong timestep lands elsewhere."""
import math

import pytest
import torch

from shared.models import sampling as S
from shared.models.schedules import alpha_s, schedule


def ideal(objective: S.Objective, mu: torch.Tensor, c: float) -> S.Model:
    table = schedule(objective.schedule)

    def model(z: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        z = z.double()
        if objective.prediction == "flow":
            t = float(timestep) / S.TRAIN_STEPS
            var = (1 - t) ** 2 * c * c + t * t
            centred = z - (1 - t) * mu
            x0 = mu + (1 - t) * c * c / var * centred
            eps = t / var * centred
            return eps - x0
        sigma = S.timestep_to_sigma(timestep, table)
        a, s = (float(v) for v in alpha_s(sigma))
        if math.isinf(float(sigma)):
            x0 = mu.expand_as(z)  # E[x0 | pure noise]
        else:
            x = z / a
            x0 = mu + c * c / (c * c + float(sigma) ** 2) * (x - mu)
        eps = z if s == 1.0 and a == 0.0 else (z - a * x0) / s
        return eps if objective.prediction == "epsilon" else a * eps - s * x0
    return model


CASES = [  # (objective, sampler, ladder)
    (S.Objective("epsilon", "sdxl"), "euler", "karras"),
    (S.Objective("epsilon", "sdxl"), "dpmpp_2m", "karras"),
    (S.Objective("v_prediction", "sdxl"), "dpmpp_2m", "karras"),
    (S.Objective("v_prediction", "ztsnr"), "euler", "trailing"),
    (S.Objective("v_prediction", "ztsnr"), "dpmpp_2m", "trailing"),
    (S.Objective("v_prediction", "novelai"), "euler", "novelai"),
    (S.Objective("v_prediction", "novelai"), "dpmpp_2m", "novelai"),
    (S.Objective("v_prediction", "ztsnr"), "euler", "novelai"),
    (S.Objective("flow", "sdxl", 3.0), "auto", "auto"),
]


@pytest.mark.parametrize("objective,method,ladder", CASES)
def test_lands_on_the_one_data_point(objective, method, ladder):
    g = torch.Generator().manual_seed(0)
    point = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
    noise = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
    sampler = S.choose(objective, method, ladder)
    out = S.sample(ideal(objective, point, 0.0), noise, objective, sampler, steps=12)
    assert torch.allclose(out, point, atol=1e-9, rtol=0)


def _exact_gaussian(objective: S.Objective, lad: S.Ladder, noise, mu, c):
    """The probability-flow ODE's end point from the sampler's start for N(mu, c^2) data (an affine map)."""
    if objective.prediction == "flow":
        return mu + c * noise
    top = float(lad.levels[0])
    if math.isinf(top):
        return mu + c * noise  # from σ = ∞ with z = ε: x0 = mu + c·z
    x_top = noise * math.sqrt(1 + top * top)
    return mu + (x_top - mu) * c / math.sqrt(c * c + top * top)


@pytest.mark.parametrize("objective", [S.Objective("epsilon", "sdxl"), S.Objective("v_prediction", "ztsnr"),
                                       S.Objective("flow", "sdxl", 3.0)])
def test_converges_to_the_ode_solution_and_second_order_beats_euler(objective):
    g = torch.Generator().manual_seed(1)
    mu = torch.randn(1, 4, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(1, 4, 4, 4, generator=g, dtype=torch.float64)
    model, c = ideal(objective, mu, 0.5), 0.5
    errors = {}
    methods = ("euler",) if objective.prediction == "flow" else ("euler", "dpmpp_2m")
    for method in methods:
        for steps in (10, 40):
            sampler = S.choose(objective, method, "auto")
            exact = _exact_gaussian(objective, S.ladder(objective, sampler.ladder, steps), noise, mu, c)
            errors[method, steps] = float((S.sample(model, noise, objective, sampler, steps) - exact).abs().max())
    assert errors["euler", 40] < errors["euler", 10] / 2.5   # first order: ~4x less error for 4x the steps
    if objective.schedule == "sdxl" and "dpmpp_2m" in methods:  # Karras σ down to 0.029: order shows
        assert errors["dpmpp_2m", 40] < errors["euler", 40] / 3
        assert errors["dpmpp_2m", 40] < errors["dpmpp_2m", 10] / 6   # second order: ~16x
    elif "dpmpp_2m" in methods:  # trailing: the last step (σ 0.16 -> 0) is first order in both
        assert errors["dpmpp_2m", 40] < errors["euler", 40]


def test_choice_per_objective():
    assert S.choose(S.Objective("epsilon", "sdxl")) == S.Sampler("dpmpp_2m", "karras", 0.0)
    assert S.choose(S.Objective("v_prediction", "ztsnr")) == S.Sampler("euler", "trailing", 0.7)
    assert S.choose(S.Objective("v_prediction", "novelai"), ladder="novelai").ladder == "novelai"
    assert S.choose(S.Objective("flow", "sdxl", 3.0)) == S.Sampler("euler", "flow", 0.0)
    with pytest.raises(ValueError, match="v-prediction"):
        S.choose(S.Objective("epsilon", "sdxl"), ladder="novelai")
    with pytest.raises(ValueError, match="flow"):
        S.choose(S.Objective("flow", "sdxl"), method="dpmpp_2m")


def test_trailing_starts_at_the_last_training_step_with_infinite_sigma():
    lad = S.ladder(S.Objective("v_prediction", "ztsnr"), "trailing", 10)
    assert lad.timesteps.tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert math.isinf(float(lad.levels[0])) and float(lad.levels[-1]) == 0.0


def test_karras_ladder_spans_the_schedule_and_timesteps_invert():
    lad = S.ladder(S.Objective("epsilon", "sdxl"), "karras", 5)
    table = schedule("sdxl")
    assert float(lad.levels[0]) == pytest.approx(float(table[-1]))
    assert float(lad.levels[4]) == pytest.approx(float(table[0]))
    assert float(lad.timesteps[0]) == pytest.approx(999) and float(lad.timesteps[-1]) == pytest.approx(0)
    back = S.timestep_to_sigma(lad.timesteps, table)
    assert torch.allclose(back, lad.levels[:-1], rtol=1e-9)
    assert float(S.sigma_to_timestep(table[500], table)) == pytest.approx(500)


def test_novelai_ladder_is_the_published_one():
    lad = S.ladder(S.Objective("v_prediction", "novelai"), "novelai", 28)
    assert lad.levels.tolist() == [20000.0, 17.8, 12.4, 9.2, 7.2, 5.4, 3.9, 2.1, 0.9, 0.0292, 0.0]
    assert float(lad.timesteps[0]) == pytest.approx(999)


def test_flow_ladder_uses_the_trained_shift():
    lad = S.ladder(S.Objective("flow", "sdxl", 3.0), "flow", 2)
    assert lad.levels.tolist() == pytest.approx([1.0, 0.75, 0.0])  # 3·0.5 / (1 + 2·0.5) = 0.75
    assert lad.timesteps.tolist() == pytest.approx([1000.0, 750.0])


def test_guidance_rescale():
    cond = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    uncond = torch.zeros(1, 4)
    plain = S.guided(uncond, cond, 3.0)
    assert plain.tolist() == [[3.0, -3.0, 3.0, -3.0]]
    full = S.guided(uncond, cond, 3.0, rescale=1.0)
    assert torch.allclose(full, cond)  # std matched to the conditional one
    half = S.guided(uncond, cond, 3.0, rescale=0.5)
    assert torch.allclose(half, 0.5 * cond + 0.5 * plain)
