"""The objective's pure functions against values computed by hand (numbers in the comments)."""
import math

import pytest
import torch

from stages.train import objective as obj


def test_sdxl_schedule_ends():
    s = obj.schedule("sdxl")
    # t=0: ᾱ = 1 − 0.00085 -> σ = sqrt(0.00085 / 0.99915) = 0.029167
    assert s[0].item() == pytest.approx(math.sqrt(0.00085 / 0.99915), rel=1e-9)
    assert s[0].item() == pytest.approx(0.0292, abs=1e-4) and s[-1].item() == pytest.approx(14.61, abs=0.01)
    assert torch.all(s[1:] > s[:-1])


def test_zero_terminal_snr_and_novelai_sigma():
    ac = obj.scaled_linear_alphas_cumprod()
    z = obj.rescale_zero_terminal_snr(ac)
    assert z[-1].item() == 0.0 and z[0].item() == pytest.approx(ac[0].item(), rel=1e-12)
    assert math.isinf(obj.schedule("ztsnr")[-1].item())
    nai = obj.schedule("novelai")
    assert nai[-1].item() == 20000.0 and nai[0].item() == pytest.approx(0.0292, abs=1e-4)
    assert torch.all(torch.isfinite(nai)) and torch.all(nai[1:] > nai[:-1])


def test_karras_by_hand():
    k = obj.karras_sigmas(3, 0.0292, 14.6, rho=7.0)
    mid = ((14.6 ** (1 / 7) + 0.0292 ** (1 / 7)) / 2) ** 7  # i = 1 of 3: halfway in σ^(1/ρ)
    assert k.tolist() == pytest.approx([14.6, mid, 0.0292], rel=1e-12)
    assert mid == pytest.approx(1.2736, abs=1e-4)  # (1.46672 + 0.60363)/2 = 1.03518; ^7 = 1.2736


def test_min_snr_weights_by_hand():
    sigma = torch.tensor([1 / math.sqrt(10), 1 / math.sqrt(2), float("inf")], dtype=torch.float64)  # SNR 10, 2, 0
    assert obj.min_snr_weight(sigma, 5, "epsilon").tolist() == pytest.approx([0.5, 1.0, 1.0])
    assert obj.min_snr_weight(sigma, 5, "v_prediction").tolist() == pytest.approx([5 / 11, 2 / 3, 0.0])
    assert obj.min_snr_weight(sigma, 5, "sample").tolist() == pytest.approx([5.0, 2.0, 0.0])


def test_targets_and_input_by_hand():
    x0, eps = torch.full((1, 1, 1, 1), 2.0), torch.full((1, 1, 1, 1), -1.0)
    one = torch.tensor([1.0])
    # σ = 1: α = s = 1/√2; v = (ε − x0)/√2 = -3/√2; input (x0 + ε)/√2 = 1/√2
    assert obj.target(x0, eps, one, "v_prediction").item() == pytest.approx(-3 / math.sqrt(2))
    assert obj.target(x0, eps, one, "epsilon").item() == -1.0
    assert obj.model_input(x0, eps, one).item() == pytest.approx(1 / math.sqrt(2))
    # VP form: sqrt(ᾱ)·x0 + sqrt(1 − ᾱ)·ε with ᾱ = 1/(1 + σ²)
    ac = obj.scaled_linear_alphas_cumprod()[500]
    sigma = ((1 - ac) / ac).sqrt().float().view(1)
    assert obj.model_input(x0, eps, sigma).item() == pytest.approx((ac.sqrt() * 2 - (1 - ac).sqrt()).item(), rel=1e-5)
    # σ = 20000: the input is almost pure noise and v almost −x0
    big = torch.tensor([20000.0])
    assert obj.model_input(x0, eps, big).item() == pytest.approx(-1.0, abs=1e-3)
    assert obj.target(x0, eps, big, "v_prediction").item() == pytest.approx(-2.0, abs=1e-3)


def test_timestep_sampling():
    g = torch.Generator().manual_seed(0)
    u = obj.sample_u(20000, "uniform", g)
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01
    ln = obj.sample_u(20000, "logit_normal", g)
    # logit-normal (0, 1) is symmetric about 0.5 and concentrated mid-range: P(0.25 < t < 0.75) = P(|u| < ln 3) ≈ 0.73
    assert abs(ln.mean().item() - 0.5) < 0.01
    assert ((ln >= 0.25) & (ln < 0.75)).double().mean().item() == pytest.approx(0.73, abs=0.02)


def test_noise_offset_is_per_sample_and_channel():
    base = obj.offset_noise((2, 4, 8, 8), 0.0, torch.Generator().manual_seed(1))
    shifted = obj.offset_noise((2, 4, 8, 8), 0.1, torch.Generator().manual_seed(1))
    d = shifted - base
    assert torch.allclose(d, d[:, :, :1, :1].expand_as(d), atol=1e-6) and d.abs().max() > 0.01


def test_flow_matching():
    x0, eps = torch.full((1, 1, 1, 1), 2.0), torch.full((1, 1, 1, 1), -1.0)
    xt, tgt = obj.flow_input(x0, eps, torch.tensor([0.25]))
    assert xt.item() == pytest.approx(0.75 * 2 + 0.25 * -1) and tgt.item() == -3.0
    assert obj.flow_shift(torch.tensor([0.5]), 3.0).item() == pytest.approx(0.75)
    assert obj.resolution_scale(2048, 2048) == 2.0


def test_infinite_sigma_is_pure_noise_and_v_is_minus_x0():
    """Zero terminal SNR without a σ_max cap: σ = ∞ must give input ε and v target −x0, not NaN."""
    x0, eps = torch.full((1, 1, 1, 1), 2.0), torch.full((1, 1, 1, 1), -1.0)
    inf = torch.tensor([float("inf")])
    assert obj.model_input(x0, eps, inf).item() == -1.0
    assert obj.target(x0, eps, inf, "v_prediction").item() == -2.0
    assert obj.min_snr_weight(inf, 5.0, "v_prediction").item() == 0.0


def test_training_loss_applies_min_snr_and_tag_weights():
    """stages.train.step.loss = mean(per-sample MSE × tag weight × min-SNR weight), checked by hand."""
    from types import SimpleNamespace

    from stages.train import step as S

    class Echo(torch.nn.Module):  # predicts its input, so the per-sample MSE is |input − target|² by hand
        def forward(self, x, t, encoder_hidden_states=None, added_cond_kwargs=None):
            return SimpleNamespace(sample=x)

    cfg = obj.ObjectiveConfig(prediction="epsilon", schedule="sdxl", timesteps="uniform", logit_mean=0.0,
                              logit_std=1.0, flow_shift=1.0, min_snr_gamma=5.0, noise_offset=0.0, tag_weighting=True,
                              caption_dropout=0.0, flip_rate=0.0, seed=0)
    sigmas = obj.schedule("sdxl")
    x0, eps = torch.full((2, 1, 1, 1), 0.5), torch.full((2, 1, 1, 1), 1.0)
    u = torch.tensor([0.0, 0.999], dtype=torch.float64)  # steps 0 and 999
    batch = S.Batch(latents=x0, noise=eps, u=u, te=torch.zeros(2, 77, 4), pooled=torch.zeros(2, 4),
                    time_ids=torch.zeros(2, 6), tag_weight=torch.tensor([2.0, 0.5]))
    loss, per, _ = S.loss(Echo(), batch, cfg, sigmas.float(), S.Precision.make("float32", "no", "cpu"))
    want_per, want = [], 0.0
    for k, (i, tw) in enumerate([(0, 2.0), (999, 0.5)]):
        s = sigmas[i].item()
        x = (0.5 + s * 1.0) / (s * s + 1) ** 0.5
        want_per.append((x - 1.0) ** 2)
        snr = 1 / s ** 2
        want += want_per[-1] * tw * (5.0 / snr if snr > 5.0 else 1.0) / 2
    assert per.tolist() == pytest.approx(want_per, rel=1e-5)
    assert loss.item() == pytest.approx(want, rel=1e-5)


def test_prior_preservation_weighs_class_images_by_lambda():
    """DreamBooth: loss = mean over the batch of per-sample MSE × (λ for a class image, 1 for an instance one)."""
    from types import SimpleNamespace

    from stages.train import step as S

    class Echo(torch.nn.Module):
        def forward(self, x, t, encoder_hidden_states=None, added_cond_kwargs=None):
            return SimpleNamespace(sample=x)

    def run(weight: float, prior: list[bool]) -> tuple[float, list[float]]:
        cfg = obj.ObjectiveConfig(prediction="epsilon", schedule="sdxl", timesteps="uniform", logit_mean=0.0,
                                  logit_std=1.0, flow_shift=1.0, min_snr_gamma=0.0, noise_offset=0.0,
                                  tag_weighting=False, caption_dropout=0.0, flip_rate=0.0, seed=0,
                                  prior_loss_weight=weight)
        x0 = torch.tensor([0.5, -0.5, 0.25, 1.0]).view(4, 1, 1, 1)
        batch = S.Batch(latents=x0, noise=torch.ones(4, 1, 1, 1), u=torch.full((4,), 0.5, dtype=torch.float64),
                        te=torch.zeros(4, 77, 4), pooled=torch.zeros(4, 4), time_ids=torch.zeros(4, 6),
                        tag_weight=torch.ones(4), prior=torch.tensor(prior))
        loss, per, _ = S.loss(Echo(), batch, cfg, obj.schedule("sdxl").float(), S.Precision.make("float32", "no", "cpu"))
        return loss.item(), per.tolist()

    prior = [False, True, False, True]
    plain, per = run(1.0, prior)
    assert plain == pytest.approx(sum(per) / 4, rel=1e-6)
    weighted, per2 = run(0.3, prior)
    assert per2 == per  # the weight changes the loss, not the per-sample error
    assert weighted == pytest.approx((per[0] + 0.3 * per[1] + per[2] + 0.3 * per[3]) / 4, rel=1e-6)
    assert run(0.0, [True] * 4)[0] == 0.0
    assert run(5.0, [False] * 4)[0] == pytest.approx(plain, rel=1e-6)  # no class image: λ does nothing


def _optimizer_config(**values):
    """The optimizer group of a train config with these flat values (the rest at their defaults)."""
    from shared.core.config import resolve
    from stages import train

    return resolve(train.Config, "train", {}, {"model": "builtin:tiny", **values}).optim


def _lr_at(kind: str, steps: list[int], total: int = 100, warmup: int = 10, peak: float = 2.0, **kw) -> list[float]:
    """The learning rate of optimizer steps `steps` (0-based) under stages.train.optim's schedule."""
    from stages.train.optim import LRSchedule

    cfg = _optimizer_config(learning_rate=peak, lr_schedule=kind, warmup_steps=warmup, lr_cycles=kw.get("cycles", 1),
                            lr_power=kw.get("power", 1.0), lr_end=kw.get("end", 1e-7), weight_decay=0.0)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    schedule, out = LRSchedule(opt, cfg, total), {}
    for step in range(max(steps) + 1):
        out[step] = schedule.lr
        assert opt.param_groups[0]["lr"] == out[step]  # what the optimizer steps with
        schedule.step()
    return [out[s] for s in steps]


@pytest.mark.parametrize("kind, want", [
    # warmup (every schedule): step s < 10 -> peak · s / 10; then, with p = (s − 10) / 90:
    ("constant", [0.0, 1.0, 2.0, 2.0, 2.0]),                                       # peak
    ("constant_with_warmup", [0.0, 1.0, 2.0, 2.0, 2.0]),
    ("linear", [0.0, 1.0, 2.0, 1.0, 2.0 * 10 / 90]),                                # peak · (1 − p)
    ("cosine", [0.0, 1.0, 2.0, 1.0, 2.0 * 0.5 * (1 + math.cos(math.pi * 80 / 90))]),  # peak · ½(1 + cos πp)
])
def test_lr_schedules_by_hand(kind, want):
    assert _lr_at(kind, [0, 5, 10, 55, 90]) == pytest.approx(want, abs=1e-12)


def test_cosine_with_restarts_and_polynomial_by_hand():
    # 2 cycles over 90 steps after warmup: p = (s − 10) / 90, lr = peak · ½(1 + cos(π · (2p mod 1)))
    got = _lr_at("cosine_with_restarts", [5, 10, 32, 54, 55, 77], cycles=2)
    cycle = [0.0, 22 / 45, 44 / 45, 0.0, 22 / 45]  # 2p mod 1 at steps 10, 32, 54, 55, 77
    want = [1.0] + [2.0 * 0.5 * (1 + math.cos(math.pi * c)) for c in cycle]
    assert got == pytest.approx(want, abs=1e-12)
    assert got[3] < 0.01 and got[4] == 2.0  # the restart: near 0 at the first cycle's end, then the peak again
    # polynomial: (peak − end) · (1 − p)^power + end, warmup as the others
    got = _lr_at("polynomial", [5, 10, 55, 100, 120], power=2.0, end=0.5)
    assert got == pytest.approx([1.0, 2.0, 1.5 * 0.25 + 0.5, 0.5, 0.5], abs=1e-12)


def test_lr_schedule_state_resumes_at_its_step_with_the_configs_peak():
    """A schedule restored from its state_dict continues at that step (bitwise); the peak comes from the config."""
    from stages.train.optim import LRSchedule

    def make(peak):
        cfg = _optimizer_config(learning_rate=peak, lr_schedule="cosine", warmup_steps=3, lr_end=0.0,
                                weight_decay=0.0)
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=peak)
        return opt, LRSchedule(opt, cfg, 20)

    opt, a = make(0.1)
    for _ in range(7):
        a.step()
    state = a.state_dict()
    assert state["step"] == 7
    opt_b, b = make(0.1)
    b.load_state_dict(state)
    assert b.lr == a.lr and opt_b.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    a.step(), b.step()
    assert b.lr == a.lr
    _, c = make(0.2)  # a forced resume with another learning rate follows the new config
    c.load_state_dict(state)
    assert c.lr == pytest.approx(2 * state["lr"])


def test_resolution_aware_noise_scales_sigma_and_shift_by_the_bucket():
    """A 2x-side bucket (k = 2): σ doubles and the UNet is given the timestep of the doubled σ; flow's shift
    doubles; off, nothing changes; the sampler's ladder scales the same way."""
    from shared.models import sampling
    from stages.train import step as S

    base = dict(prediction="epsilon", schedule="sdxl", timesteps="uniform", logit_mean=0.0, logit_std=1.0,
                flow_shift=1.0, min_snr_gamma=0.0, noise_offset=0.0, tag_weighting=False, caption_dropout=0.0,
                flip_rate=0.0, seed=0, resolution_base=64)
    sigmas = obj.schedule("sdxl").float()
    x0, eps = torch.full((1, 1, 16, 16), 0.5), torch.full((1, 1, 16, 16), 1.0)  # 128 px: k = 128/64 = 2
    batch = S.Batch(latents=x0, noise=eps, u=torch.tensor([0.5], dtype=torch.float64), te=torch.zeros(1, 77, 4),
                    pooled=torch.zeros(1, 4), time_ids=torch.zeros(1, 6), tag_weight=torch.ones(1))
    plain = S.noised(batch, obj.ObjectiveConfig(**base, resolution_noise=False), sigmas)
    scaled = S.noised(batch, obj.ObjectiveConfig(**base, resolution_noise=True), sigmas)
    assert int(plain[1]) == 500 and float(scaled[3]) == pytest.approx(2 * float(sigmas[500]))
    s = 2 * float(sigmas[500])
    assert float(scaled[0][0, 0, 0, 0]) == pytest.approx((0.5 + s) / (1 + s * s) ** 0.5, rel=1e-5)
    assert float(sigmas[int(scaled[1])]) <= s <= float(sigmas[int(scaled[1]) + 1])
    assert 500 < float(scaled[1]) < 999
    flow = obj.ObjectiveConfig(**{**base, "prediction": "flow"}, resolution_noise=True)
    assert float(S.noised(batch, flow, sigmas)[3]) == pytest.approx(2 * 0.5 / (1 + 0.5))  # shift 1 -> 2
    assert S.resolution_factor(x0, obj.ObjectiveConfig(**base, resolution_noise=False)) == 1.0
    o = sampling.Objective("epsilon", "sdxl", resolution_base=64)
    lad, lad2 = sampling.ladder(o, "karras", 4), sampling.ladder(o, "karras", 4, o.scale(128, 128))
    assert torch.allclose(lad2.levels, 2 * lad.levels)
