"""The amortized posterior (inference.amortize): an encoder trained on subjects simulated by the
model gives subtype probabilities and (D, r) posteriors in one pass; predict trusts it per subject."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import xarray as xr

from pyrovae_pde.data import cohort_tensors, domain_from_dataset, simulate
from pyrovae_pde.data.cohort import CohortTensors
from pyrovae_pde.errors import InputError
from pyrovae_pde.inference.amortize import (
    TrustRule,
    amortize,
    calibrate,
    check_amortized,
    fit_conditional_calibration,
    fit_temperature,
    simulate_like,
)
from pyrovae_pde.inference.encoding import encode_amortized_cohort
from pyrovae_pde.inference.laplace import laplace_fit
from pyrovae_pde.inference.posterior import posterior_dataset
from pyrovae_pde.inference.sbc import simulation_based_calibration
from pyrovae_pde.model.module import MixturePDE
from pyrovae_pde.model.priors import LogNormalPrior, Priors

COMPONENTS = ("diffusion", "fisher_kpp")
NOISE = 0.02


@pytest.fixture(scope="module")
def amortized():
    """A 2-mechanism graph model (its base priors as populations, noise 0.02) whose encoder was
    amortized for 400 steps on subjects simulated like a 40-subject cohort's; (module, cohort)."""
    ds = simulate("graph", 40, seed=3, noise_sd=NOISE, components=COMPONENTS)
    domain = domain_from_dataset(ds)
    data = cohort_tensors(ds, domain)
    torch.manual_seed(0)
    module = MixturePDE(domain, COMPONENTS, ds.sizes["visit"],
                        Priors(LogNormalPrior(0.05, 1.0), LogNormalPrior(0.1, 1.0)), time_scale=5.0)
    with torch.no_grad():
        module.noise_loc.fill_(math.log(NOISE))
    report = amortize(module, data, steps=400, seed=0)
    assert bool(module.amortized) and report.steps == 400 and report.bank > 0
    return module, data


def _simulated(module, data, n, seed):
    fields, times, observed, diffusivity, reaction = simulate_like(module, data, n, NOISE,
                                                                   torch.Generator().manual_seed(seed))
    return [CohortTensors([f"s{i}" for i in range(n)], fields[:, k], times, observed)
            for k in range(module.n_components)], diffusivity, reaction


def test_amortized_posterior_recovers_every_component_and_is_calibrated(amortized):
    """New simulated subjects of each mechanism: the subtype head picks it (calibrated), and the
    posterior means of D (and r) follow the truth; an encoder regressed to the prior would give
    chance accuracy and no correlation."""
    module, data = amortized
    cohorts, diffusivity, reaction = _simulated(module, data, 300, seed=5)
    accuracy, top = [], []
    for k, cohort in enumerate(cohorts):
        log_probs, guide = encode_amortized_cohort(module, cohort)
        probs = log_probs.exp()
        accuracy.append(float((probs.argmax(-1) == k).double().mean()))
        top.append(float(probs.max(-1).values.mean()))
        assert np.corrcoef(guide.d_loc[:, k], diffusivity[:, k].log())[0, 1] > 0.7, k
        if k in module.rate_index:
            column = module.rate_index.index(k)
            assert np.corrcoef(guide.r_loc[:, k], reaction[:, column].log())[0, 1] > 0.8
    assert min(accuracy) > 0.85, accuracy
    assert abs(np.mean(top) - np.mean(accuracy)) < 0.05, (top, accuracy)


def test_fit_temperature_matches_a_dense_grid_and_recovers_the_generating_temperature():
    """Labels drawn from softmax(logits / 2.5): the fitted T is the minimiser of the cross-entropy
    on a dense grid of 1 / T (exact reference), and near 2.5 for 20000 draws."""
    generator = torch.Generator().manual_seed(0)
    logits = 4.0 * torch.randn(20000, 3, generator=generator, dtype=torch.float64)
    labels = torch.multinomial(torch.softmax(logits / 2.5, -1), 1, generator=generator).flatten()
    temperature = fit_temperature(logits, labels)
    grid = torch.linspace(0.05, 2.0, 3901, dtype=torch.float64)
    losses = torch.stack([torch.nn.functional.cross_entropy(logits * b, labels) for b in grid])
    assert abs(1.0 / temperature - float(grid[losses.argmin()])) < 1e-3
    assert abs(temperature - 2.5) < 0.15


def test_conditional_calibration_recovers_a_known_dependence_and_solves_its_score_equations():
    """Errors whose mean and log sd are linear in q's standardised centre and log width: the fit
    solves the Gaussian score equations (its exact optimality conditions) and recovers the
    generating coefficients; errors with no dependence give the plain mean and sd."""
    generator = torch.Generator().manual_seed(1)
    n = 40000
    loc = 2.0 + 0.5 * torch.randn(n, generator=generator, dtype=torch.float64)
    scale = torch.exp(-3.0 + 0.3 * torch.randn(n, generator=generator, dtype=torch.float64))
    u = (loc - 2.0) / 0.5
    v = (torch.log(scale) + 3.0) / 0.3
    z = 0.2 - 0.4 * u + torch.exp(-0.5 + 0.25 * u + 0.1 * v) * torch.randn(n, generator=generator,
                                                                          dtype=torch.float64)
    fit = fit_conditional_calibration(z, loc, scale)
    x = torch.stack([torch.ones(n, dtype=torch.float64), ((loc - fit.center[0]) / fit.spread[0]).clamp(-3, 3),
                     ((torch.log(scale) - fit.center[1]) / fit.spread[1]).clamp(-3, 3)], -1)
    mean, sd = x @ fit.shift, torch.exp(x @ fit.log_stretch)
    r = (z - mean) / sd
    assert (x * (r / sd)[:, None]).mean(0).abs().max() < 1e-5
    assert (x * (1 - r ** 2)[:, None]).mean(0).abs().max() < 1e-5
    assert torch.allclose(fit.shift, torch.tensor([0.2, -0.4, 0.0], dtype=torch.float64), atol=0.03)
    assert torch.allclose(fit.log_stretch, torch.tensor([-0.5, 0.25, 0.1], dtype=torch.float64), atol=0.03)
    plain = fit_conditional_calibration(1.5 + 2.0 * torch.randn(n, generator=generator, dtype=torch.float64), loc,
                                        scale)
    assert abs(float(plain.shift[0]) - 1.5) < 0.05 and abs(float(plain.log_stretch[0]) - math.log(2.0)) < 0.02
    assert plain.shift[1:].abs().max() < 0.03 and plain.log_stretch[1:].abs().max() < 0.03


def test_shaped_summary_is_the_lognormal_one_for_a_gaussian_shape_and_integrates_a_skewed_one(amortized):
    """The amortized q's summaries: with the identity shape they equal the LogNormal closed forms;
    with a skewed shape (quantiles of a standardised Gumbel-like deviate) mean, sd and interval match
    a dense trapezoid integral over the standard-normal eps of the same piecewise-linear map."""
    from scipy import stats

    from pyrovae_pde.inference.posterior import lognormal_summary, shaped_lognormal_summary
    from pyrovae_pde.model.module import SHAPE_SCORES

    module, _ = amortized
    saved = module.amortized_quantiles.clone()
    loc = np.array([[-2.0, 0.5], [1.0, -3.0]])
    scale = np.array([[0.01, 0.4], [1.2, 0.05]])
    try:
        module.amortized_quantiles.copy_(SHAPE_SCORES.repeat(module.n_components, 2, 1))
        shaped, closed = shaped_lognormal_summary(module, loc, scale, 0), lognormal_summary(loc, scale)
        for key in closed:
            np.testing.assert_allclose(shaped[key], closed[key], rtol=1e-9)
        skewed = torch.tensor(stats.gumbel_r.ppf(stats.norm.cdf(SHAPE_SCORES.double().numpy())))
        module.amortized_quantiles.copy_(skewed.to(module.amortized_quantiles).repeat(module.n_components, 2, 1))
        shaped = shaped_lognormal_summary(module, loc, scale, 1)
        eps = torch.linspace(-12, 12, 200001, dtype=torch.float64)
        deviates = module.shape(eps[:, None].expand(-1, module.n_components), 1)[:, 0].numpy()
        density = stats.norm.pdf(eps.numpy())
        for i in range(2):
            for j in range(2):
                values = np.exp(loc[i, j] + scale[i, j] * deviates)
                mean = np.trapezoid(values * density, eps.numpy())
                sd = np.sqrt(np.trapezoid((values - mean) ** 2 * density, eps.numpy()))
                np.testing.assert_allclose(shaped[""][i, j], mean, rtol=1e-6)
                np.testing.assert_allclose(shaped["_sd"][i, j], sd, rtol=1e-5)
        low = module.shape(torch.full((1, module.n_components), -1.6448536269514722, dtype=torch.float64), 1)[0, 0]
        np.testing.assert_allclose(shaped["_q05"], np.exp(loc + scale * float(low)), rtol=1e-12)
        assert float(low) > -1.6448536269514722  # the Gumbel's short left tail
    finally:
        module.amortized_quantiles.copy_(saved)


def test_runs_saved_with_a_constant_shift_and_stretch_load_as_that_affine_map(amortized):
    module, data = amortized
    state = {k: v for k, v in module.state_dict().items()
             if k not in ("amortized_shift", "amortized_log_stretch", "amortized_center", "amortized_spread",
                          "amortized_temperature", "amortized_quantiles")}
    shift = torch.tensor([[0.3, 0.0], [-0.2, 0.5]])
    stretch = torch.tensor([[0.8, 1.0], [1.2, 0.6]])
    state["amortized_shift"], state["amortized_stretch"] = shift, stretch
    old = module.submodel([0, 1])
    old.load_state_dict(state)
    cohort = data.subset(torch.arange(8))
    with torch.no_grad():
        _, d_loc, d_scale, r_loc, r_scale = old.encode_amortized(cohort.signal, cohort.times, cohort.observed)
        _, d0, ds0, r0, rs0 = old.encode_amortized(cohort.signal, cohort.times, cohort.observed, calibrated=False)
    assert torch.allclose(d_loc, d0 + shift[:, 0] * ds0, atol=1e-5)
    assert torch.allclose(d_scale, ds0 * stretch[:, 0], rtol=1e-5)
    assert torch.allclose(r_loc, r0 + shift[1:, 1] * rs0, atol=1e-5)
    assert torch.allclose(r_scale, rs0 * stretch[1:, 1], rtol=1e-5)


def test_calibrate_undoes_a_mis_scaled_subtype_head(amortized):
    """Logits made 4x too sharp (or 4x too flat) by hand: calibrate's temperature brings the mean
    top probability of new simulated subjects back to their accuracy, which it does not change."""
    module, data = amortized
    cohorts, _, _ = _simulated(module, data, 200, seed=11)
    original = [p.detach().clone() for p in module.subtype_head.net[-1].parameters()]
    try:
        for factor in (4.0, 0.25):
            with torch.no_grad():
                for p, o in zip(module.subtype_head.net[-1].parameters(), original):
                    p.copy_(o * factor)
            gaps, accuracy = {}, {}
            for stage in ("mis-scaled", "calibrated"):
                if stage == "calibrated":
                    calibrate(module, data, 512, NOISE, torch.Generator().manual_seed(12))
                else:
                    module.amortized_temperature.fill_(1.0)
                probs = torch.cat([encode_amortized_cohort(module, c)[0].exp() for c in cohorts])
                truth = torch.arange(len(cohorts)).repeat_interleave(200)
                accuracy[stage] = float((probs.argmax(-1) == truth).double().mean())
                gaps[stage] = float(probs.max(-1).values.mean()) - accuracy[stage]
            assert accuracy["calibrated"] == accuracy["mis-scaled"]
            assert abs(gaps["mis-scaled"]) > 0.03, (factor, gaps)
            assert abs(gaps["calibrated"]) < min(0.02, abs(gaps["mis-scaled"]) / 3), (factor, gaps)
            assert (float(module.amortized_temperature) > 1.0) == (factor > 1.0)
    finally:
        with torch.no_grad():
            for p, o in zip(module.subtype_head.net[-1].parameters(), original):
                p.copy_(o)
        calibrate(module, data, 1024, NOISE, torch.Generator().manual_seed(2))


def test_simulation_based_calibration_of_the_amortized_guide(amortized):
    """SBC ranks of log D and log r among draws of the amortized guide are not rejected as uniform,
    and not piled at the ends (an over-confident guide puts the truth outside its draws)."""
    module, data = amortized
    sbc = simulation_based_calibration(module, data, n_simulations=300, n_draws=9, seed=2, posterior="amortized")
    assert sbc.attrs["posterior"] == "amortized guide"
    tested = sbc["p_value"].values[np.isfinite(sbc["p_value"].values)]
    assert len(tested) == 3  # D of both mechanisms, r of fisher_kpp
    assert tested.min() > 1e-3, sbc["p_value"].values
    ranks = sbc["rank"].values[np.isfinite(sbc["rank"].values)]
    assert np.mean((ranks == 0) | (ranks == 9)) < 0.3  # 0.2 if uniform


def test_amortized_sbc_needs_an_amortized_model(amortized):
    module, data = amortized
    fresh = module.submodel([0, 1])
    with pytest.raises(InputError, match="--amortize-steps"):
        simulation_based_calibration(fresh, data, n_simulations=5, posterior="amortized")


def test_check_gain_is_the_newton_decrement_from_an_offset_centre(amortized):
    """Reference: the converged Laplace fit (float64). At its mode the gain is ~0; from a centre
    3 posterior sds of log D away it is 9/2 * C_aa * H_aa nats, and the sd ratio of the Laplace sd
    itself is 1."""
    module, data = amortized
    cohort = data.subset(torch.arange(8))
    fit = laplace_fit(module, cohort, NOISE, n_iter=30, tol=1e-9, dtype=torch.float64, broyden=False)
    k = 1  # fisher_kpp: both coordinates
    mode, cov = fit.mean[:, k], fit.cov[:, k]
    component = torch.full((8,), k)

    def check(offset):
        d_loc = torch.zeros(8, 2, dtype=torch.float64)
        r_loc = torch.zeros(8, 2, dtype=torch.float64)
        d_loc[:, k] = mode[:, 0] + offset * cov[:, 0, 0].sqrt()
        r_loc[:, k] = mode[:, 1]
        d_scale = torch.ones(8, 2, dtype=torch.float64)
        d_scale[:, k] = 1.0 / torch.linalg.inv(cov)[:, 0, 0].sqrt()  # the sd of log D given log r
        return check_amortized(module, cohort, component, d_loc, d_scale, r_loc, NOISE, dtype=torch.float64)

    at_mode = check(0.0)
    assert at_mode.gain.max() < 0.05, at_mode.gain
    expected = 4.5 * cov[:, 0, 0] * torch.linalg.inv(cov)[:, 0, 0]
    off = check(3.0)
    assert torch.allclose(off.gain, expected, rtol=0.15), (off.gain, expected)
    conditional = 1.0 / torch.linalg.inv(cov)[:, 0, 0].sqrt() / cov[:, 0, 0].sqrt()
    assert torch.allclose(at_mode.sd_ratio, conditional, rtol=0.05)


def test_check_fit_p_is_uniform_at_the_models_noise_and_tiny_at_three_times_it(amortized):
    """At the truth of subjects simulated at the model's noise the residuals' chi-square p is
    roughly uniform (few below 0.01); with three times that noise every subject's is below the
    rule's 1e-4, so predict refines them (the encoder, trained at the model's noise, is
    confidently wrong there)."""
    module, data = amortized
    k = 1
    fractions = {}
    for factor in (1.0, 3.0):
        fields, times, observed, diffusivity, reaction = simulate_like(module, data, 200, NOISE * factor,
                                                                       torch.Generator().manual_seed(21))
        cohort = CohortTensors([f"s{i}" for i in range(200)], fields[:, k], times, observed)
        d_loc = torch.zeros(200, 2)
        r_loc = torch.zeros(200, 2)
        d_loc[:, k], r_loc[:, k] = diffusivity[:, k].log(), reaction[:, 0].log()
        check = check_amortized(module, cohort, torch.full((200,), k), d_loc, torch.ones(200, 2), r_loc, NOISE,
                                dtype=torch.float64)
        fractions[factor] = (float((check.fit_p < 0.01).double().mean()),
                             float((check.fit_p < TrustRule().min_fit_p).double().mean()))
    assert fractions[1.0][0] < 0.05 and fractions[3.0][1] == 1.0, fractions


def test_auto_predict_refines_exactly_the_subjects_the_rule_flags(amortized):
    module, data = amortized
    cohorts, _, _ = _simulated(module, data, 20, seed=9)
    cohort = CohortTensors([f"s{i}" for i in range(40)], torch.cat([c.signal for c in cohorts]),
                           torch.cat([c.times for c in cohorts]), torch.cat([c.observed for c in cohorts]))
    alone = posterior_dataset(module, cohort, refine=False)
    assert int(alone["refined"].sum()) == 0 and np.isnan(alone["log_evidence_component"].values).all()
    trusting = posterior_dataset(module, cohort, refine="auto",
                                 trust=TrustRule(min_top_probability=0.0, max_gain=math.inf, max_sd_ratio=math.inf))
    assert trusting.attrs["n_refined"] == 0
    np.testing.assert_allclose(trusting["subtype_prob"].values, alone["subtype_prob"].values)
    doubting = posterior_dataset(module, cohort, refine="auto", trust=TrustRule(min_top_probability=1.01))
    everyone = posterior_dataset(module, cohort, refine=True)
    assert doubting.attrs["n_refined"] == 40 and int(everyone["refined"].sum()) == 40
    np.testing.assert_allclose(doubting["subtype_prob"].values, everyone["subtype_prob"].values, atol=1e-6)
    default = posterior_dataset(module, cohort, refine="auto")
    refined = default["refined"].values.astype(bool)
    probs = default["subtype_prob"].values
    assert (probs.max(1)[~refined] >= TrustRule().min_top_probability).all()
    np.testing.assert_allclose(probs[~refined], alone["subtype_prob"].values[~refined])
    truth = np.repeat([0, 1], 20)
    assert (probs.argmax(1) == truth).mean() >= (everyone["subtype_prob"].values.argmax(1) == truth).mean() - 0.05


def test_runs_saved_before_the_subtype_head_load_unamortized_and_refine_everyone(amortized):
    module, data = amortized
    state = {k: v for k, v in module.state_dict().items() if not k.startswith("subtype_head.") and k != "amortized"}
    old = module.submodel([0, 1])
    old.load_state_dict(state)
    assert not bool(old.amortized)
    post = posterior_dataset(old, data.subset(torch.arange(6)), refine="auto")
    assert post.attrs["n_refined"] == 6


def test_predict_and_sbc_commands_use_the_amortized_encoder(amortized, tmp_path, capsys):
    """The CLI on a saved amortized run: predict says how many subjects it refined (auto by
    default, none with --refine none); sbc --posterior amortized ranks draws of the encoder alone;
    on a run without amortization that is one clear error naming the fix."""
    from pyrovae_pde.data import save_dataset
    from pyrovae_pde.interfaces.api import SubtypeModel
    from pyrovae_pde.interfaces.cli import main

    module, _ = amortized
    model = SubtypeModel(module.components, priors=module.priors)
    model.domain_, model.time_scale_, model.module_ = module.domain, module.time_scale, module
    model.save(tmp_path / "run")
    cohort = tmp_path / "new.nc"
    save_dataset(simulate("graph", 12, seed=8, noise_sd=NOISE, components=COMPONENTS), cohort)
    assert main(["predict", str(tmp_path / "run"), str(cohort), "--out", str(tmp_path / "auto.nc")]) == 0
    first = capsys.readouterr()
    assert "noisier than the fitted model" not in first.err
    noisy = tmp_path / "noisy.nc"  # three times the model's noise: every subject's residuals say so
    save_dataset(simulate("graph", 12, seed=8, noise_sd=3 * NOISE, components=COMPONENTS), noisy)
    assert main(["predict", str(tmp_path / "run"), str(noisy), "--out", str(tmp_path / "noisy_post.nc")]) == 0
    captured = capsys.readouterr()
    # the residual test runs where the subtype probability passes; the others are refined anyway
    noisier = re.search(r"(\d+) of 12 subjects' scans are noisier than the fitted model", captured.err)
    assert noisier and int(noisier.group(1)) >= 6, captured.err
    assert xr.load_dataset(tmp_path / "noisy_post.nc").attrs["n_refined"] == 12
    assert main(["predict", str(tmp_path / "run"), str(cohort), "--refine", "none",
                 "--out", str(tmp_path / "none.nc")]) == 0
    out = first.out + capsys.readouterr().out
    counts = [(int(a), int(b)) for a, b in re.findall(r"\((\d+) refined, (\d+) by the encoder alone\)", out)]
    assert len(counts) == 2 and sum(counts[0]) == 12 and counts[1] == (0, 12), out
    assert main(["predict", str(tmp_path / "run"), str(cohort), "--trust-probability", "1.5",
                 "--out", str(tmp_path / "bad.nc")]) == 2
    assert "--trust-probability 1.5" in capsys.readouterr().err and not (tmp_path / "bad.nc").exists()
    assert main(["sbc", str(tmp_path / "run"), str(cohort), "--posterior", "amortized", "--simulations", "40",
                 "--draws", "9", "--out", str(tmp_path / "sbc")]) == 0
    assert "amortized guide" in capsys.readouterr().out
    old = SubtypeModel(module.components, priors=module.priors)
    old.domain_, old.time_scale_, old.module_ = module.domain, module.time_scale, module.submodel([0, 1])
    old.save(tmp_path / "old")
    assert main(["sbc", str(tmp_path / "old"), str(cohort), "--posterior", "amortized",
                 "--out", str(tmp_path / "sbc_old")]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("warning:")]
    assert len(err) == 1 and "--amortize-steps" in err[0] and "Traceback" not in err[0], err
