"""Mixture population priors (issue: training): a tied population of log D and of log r that is a
mixture of Gaussians, so that a skewed or bounded distribution of parameters (the simulators'
uniform D and r) is not forced into one Gaussian."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pyro
import pytest
import torch
from conftest import graph_mixture_module
from scipy.stats import norm

from pyrovae_pde.data import cohort_tensors, domain_from_dataset, simulate
from pyrovae_pde.errors import InputError
from pyrovae_pde.inference.comparison import FittedRun, compare_models
from pyrovae_pde.inference.laplace import LaplaceFit
from pyrovae_pde.inference.population import Population, em_population, mixture_moments, under_mixture_population
from pyrovae_pde.model.priors import LogNormalPrior, Priors

F64 = torch.float64


def _normal(x, loc, scale):
    return -0.5 * ((x - loc) / scale) ** 2 - math.log(scale) - 0.5 * math.log(2 * math.pi)


def _mixture_log_density(x, weight, loc, scale):
    return np.logaddexp.reduce([math.log(w) + _normal(x, m, s) for w, m, s in zip(weight, loc, scale)], axis=0)


def test_mixture_evidence_and_posterior_equal_a_dense_grid():
    """With a likelihood exactly Gaussian in (log D, log r) (correlated), the log evidence and the
    posterior mean and covariance under a 3-term mixture population, re-weighted in closed form
    from a Laplace fit under the mixture's Gaussian, equal a dense-grid quadrature (to 1e-6)."""
    weight = np.array([[0.2, 0.5, 0.3], [0.6, 0.3, 0.1]])  # (coordinate, term)
    loc = np.array([[-3.0, -1.5, -0.3], [-4.0, -3.0, -2.5]])
    scale = np.array([[0.8, 0.4, 0.15], [0.5, 0.3, 0.1]])
    g_loc, g_scale = mixture_moments(torch.tensor(weight), torch.tensor(loc), torch.tensor(scale))
    variance = 0.01
    # three subjects: likelihood centre theta_hat and J^T J (aa, ab, bb), log L(theta_hat) = 0
    centres = np.array([[-1.2, -2.9], [-0.4, -2.4], [-2.5, -3.6]])
    jtj = np.array([[0.5, 0.2, 0.3], [2.0, -0.9, 1.0], [0.05, 0.01, 0.08]])
    grid = np.linspace(-8.0, 2.0, 1201)
    a, b = np.meshgrid(grid, grid, indexing="ij")
    cell = (grid[1] - grid[0]) ** 2
    means, covs, log_z_old, ref = [], [], [], []
    for (ca, cb), (aa, ab, bb) in zip(centres, jtj):
        log_lik = -0.5 * (aa * (a - ca) ** 2 + 2 * ab * (a - ca) * (b - cb) + bb * (b - cb) ** 2) / variance
        # the Laplace fit under the Gaussian (exact here): mode, covariance, evidence
        prec = np.array([[aa, ab], [ab, bb]]) / variance + np.diag(1 / g_scale.numpy() ** 2)
        rhs = np.array([[aa, ab], [ab, bb]]) @ np.array([ca, cb]) / variance + g_loc.numpy() / g_scale.numpy() ** 2
        means.append(np.linalg.solve(prec, rhs))
        covs.append(np.linalg.inv(prec))
        gauss = _normal(a, float(g_loc[0]), float(g_scale[0])) + _normal(b, float(g_loc[1]), float(g_scale[1]))
        log_z_old.append(np.log(np.exp(log_lik + gauss).sum() * cell))
        log_post = log_lik + _mixture_log_density(a, weight[0], loc[0], scale[0]) + _mixture_log_density(
            b, weight[1], loc[1], scale[1])
        mass = np.exp(log_post).sum() * cell
        p = np.exp(log_post) * cell / mass
        ma, mb = (p * a).sum(), (p * b).sum()
        ref.append((math.log(mass), [ma, mb], [[(p * (a - ma) ** 2).sum(), (p * (a - ma) * (b - mb)).sum()],
                                              [(p * (a - ma) * (b - mb)).sum(), (p * (b - mb) ** 2).sum()]]))
    fit = LaplaceFit(torch.tensor(np.array(means))[:, None], torch.tensor(np.array(covs))[:, None],
                     torch.tensor(log_z_old)[:, None], torch.zeros(3, 1, dtype=F64), torch.ones(3, dtype=F64),
                     torch.tensor([True]), torch.tensor(jtj)[:, None], variance=variance)
    module = SimpleNamespace(population_terms=3, population_loc=g_loc[None], population_scale=g_scale[None],
                             population_term_weight=torch.tensor(weight)[None],
                             population_term_loc=torch.tensor(loc)[None],
                             population_term_scale=torch.tensor(scale)[None],
                             clamp_theta=lambda a, b: (a.clamp(-20, 10), b.clamp(-20, 10)))
    out = under_mixture_population(module, fit)
    for i, (log_z, mean, cov) in enumerate(ref):
        assert float(out.log_evidence[i, 0]) == pytest.approx(log_z, abs=1e-6)
        np.testing.assert_allclose(out.mean[i, 0].numpy(), mean, atol=1e-6)
        np.testing.assert_allclose(out.cov[i, 0].numpy(), cov, atol=1e-6)


def _precise_fits(theta: np.ndarray, base: Population, k: int):
    """Laplace fits (mean, jtj, log evidence) of precise measurements (sd 0.05) of theta (N, 2),
    the same for k components, made under the Gaussian ``base`` (observation variance 1)."""
    rng = np.random.default_rng(0)
    lam = 1 / 0.05 ** 2
    obs = theta + 0.05 * rng.standard_normal(theta.shape)
    prec = lam + 1 / base.scale.numpy()[0] ** 2
    mode = (lam * obs + base.loc.numpy()[0] / base.scale.numpy()[0] ** 2) / prec
    n = len(theta)
    mean = torch.tensor(np.repeat(mode[:, None, :], k, axis=1))
    jtj = torch.tensor([[[lam, 0.0, lam]] * k] * n, dtype=F64)
    # log evidence under base, up to a constant shared by every population: log N(obs; loc, 1/lam + s^2)
    s2 = 1 / lam + base.scale.numpy()[0] ** 2
    log_z = (-0.5 * (obs - base.loc.numpy()[0]) ** 2 / s2 - 0.5 * np.log(2 * np.pi * s2)).sum(1)
    return mean, jtj, torch.tensor(np.repeat(log_z[:, None], k, axis=1))


def test_mixture_em_follows_uniform_parameters_better_than_one_gaussian():
    """Subjects with D ~ U(0.01, 1) and r ~ U(0.01, 0.1) (the paper-grid simulator: skewed, with a
    sharp upper edge in log space), measured precisely, two mechanisms sharing them: the tied
    mixture EM (3 terms) reaches a higher log marginal likelihood than the tied Gaussian and puts a
    higher density on new draws of the same distribution; its terms' mean and sd match the
    subjects' and its mixture weights stay at the shares of the mechanisms."""
    rng = np.random.default_rng(7)
    n = 800
    theta = np.stack([np.log(rng.uniform(0.01, 1.0, n)), np.log(rng.uniform(0.01, 0.1, n))], 1)
    priors = Priors(LogNormalPrior(0.001, 10.0), LogNormalPrior(0.001, 1.0))
    base = Population(torch.tensor([[priors.diffusivity.loc, priors.reaction.loc]] * 2, dtype=F64),
                      torch.tensor([[priors.diffusivity.scale, priors.reaction.scale]] * 2, dtype=F64))
    mean, jtj, log_z = _precise_fits(theta, base, 2)
    log_z = log_z + torch.tensor(np.where(rng.uniform(size=(n, 1)) < 0.7, [0.0, -30.0], [-30.0, 0.0]))
    has_rate = torch.tensor([True, True])
    gauss, w1, _, z1 = em_population(mean, jtj, 1.0, log_z, base, priors, has_rate, n_iter=200, tied=True)
    mix, w3, _, z3 = em_population(mean, jtj, 1.0, log_z, base, priors, has_rate, n_iter=200, tied=True, n_terms=3)
    assert mix.terms is not None and mix.n_terms == 3 and gauss.terms is None
    for t in mix.terms:  # tied: both mechanisms carry the same terms
        assert torch.equal(t[0], t[1])
    assert torch.allclose(mix.terms[0].sum(-1), torch.ones(2, 2, dtype=F64))
    total_1 = float(torch.logsumexp(torch.log(w1) + z1, 1).sum())
    total_3 = float(torch.logsumexp(torch.log(w3) + z3, 1).sum())
    assert total_3 > total_1 + 150.0  # nats over 800 subjects (measured 351): the Gaussian misfits the shape
    fresh = np.stack([np.log(rng.uniform(0.01, 1.0, 20000)), np.log(rng.uniform(0.01, 0.1, 20000))], 1)
    for c in (0, 1):
        w, m, s = (t[0, c].numpy() for t in mix.terms)
        mixture = _mixture_log_density(fresh[:, c], w, m, s).mean()
        single = _normal(fresh[:, c], float(gauss.loc[0, c]), float(gauss.scale[0, c])).mean()
        assert mixture > single + 0.1  # nats per draw (measured 0.29 for log D, 0.18 for log r)
        assert float(mix.loc[0, c]) == pytest.approx(theta[:, c].mean(), abs=4 * theta[:, c].std() / math.sqrt(n))
        assert float(mix.scale[0, c]) == pytest.approx(math.sqrt(theta[:, c].var() + 0.05 ** 2), rel=0.1)
    assert w3.numpy() == pytest.approx([0.7, 0.3], abs=0.05)


def _mixture_module():
    ds = simulate("graph", 6, seed=3, noise_sd=0.02, components=("diffusion", "fisher_kpp"))
    module = graph_mixture_module(domain_from_dataset(ds), ds).double()
    weight = torch.tensor([[[0.2, 0.5, 0.3], [0.6, 0.3, 0.1]]] * 2, dtype=F64)
    loc = torch.tensor([[[-3.0, -1.5, -0.3], [-2.0, -1.0, -0.5]]] * 2, dtype=F64)
    scale = torch.tensor([[[0.8, 0.4, 0.15], [0.5, 0.3, 0.1]]] * 2, dtype=F64)
    module.set_population(*mixture_moments(weight, loc, scale), (weight, loc, scale))
    return ds, module


def test_the_model_site_draws_and_saved_state_use_the_mixture(tmp_path):
    """The model's sample sites score D and r by the mixture (population_log_prob, with the LogNormal
    Jacobian), draws from the population follow its moments, and a saved state keeps M = 3 terms
    when loaded into a fresh module (whose default is one term); a state saved before mixture
    populations (no term buffers) loads as one Gaussian."""
    ds, module = _mixture_module()
    data = cohort_tensors(ds, module.domain).to("cpu", F64)
    d = torch.tensor([[0.05, 0.2, 0.9, 0.3, 0.1, 0.5], [0.3, 0.04, 0.6, 0.2, 0.7, 0.1]], dtype=F64)  # (K, B)
    r = torch.tensor([[0.1, 0.3, 0.5, 0.9, 0.2, 0.6]], dtype=F64)  # (K_r, B): fisher_kpp
    conditioned = pyro.poutine.condition(module.model, data={"diffusivity": d, "reaction": r})
    trace = pyro.poutine.trace(conditioned).get_trace(data.signal, data.times, data.observed)
    trace.compute_log_prob()
    log_a, _ = module.population_log_prob(d.log().T, torch.zeros(6, 2, dtype=F64))
    _, log_b = module.population_log_prob(torch.zeros(6, 2, dtype=F64), torch.cat([r, r]).log().T)
    torch.testing.assert_close(trace.nodes["diffusivity"]["log_prob"], (log_a - d.log().T).T)
    torch.testing.assert_close(trace.nodes["reaction"]["log_prob"][0], log_b[:, 1] - r[0].log())

    generator = torch.Generator().manual_seed(0)
    log_d, log_r = module.draw_population(40000, F64, generator=generator)
    for c, x in ((0, log_d[:, 0]), (1, log_r[:, 0])):
        mean, sd = float(module.population_loc[0, c]), float(module.population_scale[0, c])
        assert float(x.mean()) == pytest.approx(mean, abs=4 * sd / math.sqrt(len(x)))
        assert float(x.std()) == pytest.approx(sd, rel=0.02)
    above = float((log_d[:, 0] > -0.6).double().mean())  # mostly the narrow top term's mass
    w, m, s = (t[0, 0].numpy() for t in (module.population_term_weight, module.population_term_loc,
                                          module.population_term_scale))
    exact = float((w * norm.sf(-0.6, m, s)).sum())
    assert above == pytest.approx(exact, abs=4 * math.sqrt(exact * (1 - exact) / len(log_d)))

    torch.save(module.state_dict(), tmp_path / "m.pt")
    fresh = graph_mixture_module(domain_from_dataset(ds), ds).double()
    assert fresh.population_terms == 1
    fresh.load_state_dict(torch.load(tmp_path / "m.pt"))
    assert fresh.population_terms == 3
    torch.testing.assert_close(fresh.population_term_scale, module.population_term_scale)
    old = {k: v for k, v in module.state_dict().items() if not k.startswith("population_term")}
    fresh.load_state_dict(old)
    assert fresh.population_terms == 1
    torch.testing.assert_close(fresh.population_term_loc[..., 0], module.population_loc)


def test_learned_population_comparison_refuses_a_mixture_population():
    """compare --evidence-population learned integrates Gaussian populations only: a fit with a
    mixture population gets one clear error naming both ways out, not a wrong evidence."""
    ds, module = _mixture_module()
    data = cohort_tensors(ds, module.domain).to("cpu", F64)
    with pytest.raises(InputError, match="--population-terms 1"):
        compare_models({"mixture": [FittedRun(module, data, True)]}, population="learned")


def test_a_mixture_term_is_no_wider_than_the_base_prior_and_wild_extrapolations_fall_back():
    """Regression (tutorial 02: a diffusion-only fit of mixture data diverged): subjects a mechanism
    cannot fit have scattered modes, and the mixture EM gave them a term wider than the base prior
    (4.0 base sds here without the cap); and a subject whose likelihood is nearly flat had its
    closed-form mixture posterior extrapolated far outside the parameter range, where every guide
    draw failed. Now each term's sd is at most the base prior's, and such a (subject, mechanism)
    keeps the Gaussian's Laplace approximation while the others get the mixture's."""
    rng = np.random.default_rng(5)
    theta = np.concatenate([np.stack([rng.normal(-1, 0.3, 300), rng.normal(-3, 0.2, 300)], 1),
                            np.stack([rng.uniform(-9, 5, 40), rng.normal(-3, 0.2, 40)], 1)])
    priors = Priors(LogNormalPrior(0.01, 10.0), LogNormalPrior(0.001, 1.0))
    base = Population(torch.tensor([[priors.diffusivity.loc, priors.reaction.loc]], dtype=F64),
                      torch.tensor([[priors.diffusivity.scale, priors.reaction.scale]], dtype=F64))
    mean, jtj, log_z = _precise_fits(theta, base, 1)
    pop, *_ = em_population(mean, jtj, 1.0, log_z, base, priors, torch.tensor([True]), n_iter=50, tied=True,
                            n_terms=3)
    assert float(pop.terms[2][0, 0].max()) <= priors.diffusivity.scale * (1 + 1e-9)
    assert float(pop.terms[2][0, 1].max()) <= priors.reaction.scale * (1 + 1e-9)

    # two subjects: a precise one (likelihood centre -1, precision 100) and a nearly flat one (centre
    # -300, precision 0.01: one-sided in practice), Laplace fits under the mixture's Gaussian (sd 0.85),
    # then re-weighted to the mixture, whose wide rare term (sd 3 at -2) pulls the flat one to about -26
    weight, loc, scale = (torch.tensor([[[0.95, 0.05], [1.0, 1e-9]]], dtype=F64),
                          torch.tensor([[[0.0, -2.0], [0.0, 0.0]]], dtype=F64),
                          torch.tensor([[[0.3, 3.0], [1.0, 1.0]]], dtype=F64))
    g_loc, g_scale = mixture_moments(weight, loc, scale)
    lam, centre = torch.tensor([100.0, 0.01], dtype=F64), torch.tensor([-1.0, -300.0], dtype=F64)
    prec = lam + g_scale[0, 0] ** -2
    mode = (lam * centre + g_loc[0, 0] * g_scale[0, 0] ** -2) / prec  # (2,)
    r_var = 1 / (100.0 + g_scale[0, 1] ** -2)
    fit = LaplaceFit(torch.stack([mode, torch.zeros(2, dtype=F64)], -1)[:, None],
                     torch.diag_embed(torch.stack([1 / prec, torch.full((2,), float(r_var), dtype=F64)], -1))[:, None],
                     torch.tensor([[-5.0], [-400.0]], dtype=F64), torch.zeros(2, 1, dtype=F64),
                     torch.ones(2, dtype=F64), torch.tensor([True]),
                     torch.stack([lam, torch.zeros(2, dtype=F64), torch.full((2,), 100.0, dtype=F64)], -1)[:, None],
                     variance=1.0)
    module = SimpleNamespace(population_terms=2, population_loc=g_loc, population_scale=g_scale,
                             population_term_weight=weight, population_term_loc=loc, population_term_scale=scale,
                             clamp_theta=lambda a, b: (a.clamp(-6.0, 4.0), b.clamp(-6.0, 4.0)))
    unguarded = under_mixture_population(SimpleNamespace(**{**vars(module), "clamp_theta": lambda a, b: (a, b)}),
                                         fit)
    assert float(unguarded.mean[1, 0, 0]) < -20.0  # what the closed form alone gives
    out = under_mixture_population(module, fit)
    assert torch.equal(out.mean[1], fit.mean[1]) and torch.equal(out.cov[1], fit.cov[1])
    assert torch.equal(out.log_evidence[1], fit.log_evidence[1])
    assert not torch.equal(out.mean[0], fit.mean[0]) and -6.0 < float(out.mean[0, 0, 0]) < 4.0
    assert torch.isfinite(out.log_evidence).all()
