"""Training that converges: the single PDE trains as well as inside the mixture, non-finite values
are recovered from or stop cleanly, every run records whether it converged and the commands that
use an unconverged run say so, restarts, and the EM of the population priors."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import graph_mixture_module

from pyrovae_pde.data import cohort_tensors, domain_from_dataset, save_dataset, simulate
from pyrovae_pde.inference.objective import evaluate_elbo, refine
from pyrovae_pde.inference.population import Population, em_population, reweight_laplace
from pyrovae_pde.inference.search import search_modes
from pyrovae_pde.inference.train import TrainConfig, train
from pyrovae_pde.interfaces.api import SubtypeModel
from pyrovae_pde.interfaces.cli import main
from pyrovae_pde.model.priors import LogNormalPrior, Priors

GRAPH_PRIORS = {"diffusivity": (0.05, 1.0), "reaction": (0.1, 1.0)}
QUICK = dict(progress=False, warmup_sleep_steps=50, distill_steps=50)


def _elbo_per_subject(model: SubtypeModel, ds) -> float:
    """The fitted model's ELBO per subject on ``ds`` under its semi-amortized guide (16 draws)."""
    module = model.module_
    data = model.tensors(ds, "test")
    refined, _ = refine(module, data, n_iter=6)
    return evaluate_elbo(module, data, refined, n_draws=16, seed=5)[0]


@pytest.mark.parametrize("benchmark, single, mixture, n", [
    ("graph", "fisher_kpp", "diffusion,fisher_kpp", 150),
    ("paper-grid", "fisher_kpp", "fisher_kpp,zeldovich", 60),
])
def test_single_pde_trains_as_well_as_inside_the_mixture(benchmark, single, mixture, n):
    """Data from one PDE: the K = 1 fit reaches at least the ELBO per subject of the K = 2 mixture
    fitted to the same data (within 1 nat per subject), and both say they converged. (Before the
    semi-amortized training the K = 1 graph fit wandered between -4,900 and -10 nats per subject
    while the mixture reached +200.)"""
    priors = GRAPH_PRIORS if benchmark == "graph" else None
    ds = simulate(benchmark, n, seed=21, noise_sd=0.02, components=(single,))
    fits = {name: SubtypeModel(name, priors=priors).fit(ds, seed=0, **QUICK) for name in (single, mixture)}
    for name, model in fits.items():
        assert model.converged_, (name, model.convergence_)
    elbo = {name: _elbo_per_subject(model, ds) for name, model in fits.items()}
    assert elbo[single] >= elbo[mixture] - 1.0, elbo
    # and the single PDE is a good fit: its noise estimate is the simulator's
    noise = math.exp(float(fits[single].module_.noise_loc.detach()))
    assert noise == pytest.approx(0.02, rel=0.1)


@pytest.fixture(scope="module")
def small_graph():
    ds = simulate("graph", 60, seed=7, noise_sd=0.02)
    domain = domain_from_dataset(ds)
    return ds, domain, cohort_tensors(ds, domain)




def test_a_poisoned_batch_is_skipped_and_training_recovers(small_graph, tmp_path, monkeypatch):
    """One minibatch whose signal is NaN (a poisoned batch) in the third training step: the step is
    skipped and counted, the run goes on, ends with finite parameters, says it converged and leaves
    a loadable checkpoint."""
    from pyrovae_pde.inference.trainer import Trainer

    ds, domain, data = small_graph
    module = graph_mixture_module(domain, ds)
    original = Trainer.wake_step
    calls = {"n": 0}

    def poisoned(self, idx, refined):
        calls["n"] += 1
        if calls["n"] != 3:
            return original(self, idx, refined)
        saved = self.train_data.signal[idx].clone()
        self.train_data.signal[idx] = float("nan")
        try:
            return original(self, idx, refined)
        finally:
            self.train_data.signal[idx] = saved

    monkeypatch.setattr(Trainer, "wake_step", poisoned)
    state = train(module, data, TrainConfig(seed=0, batch_size=16, **QUICK), checkpoint_dir=tmp_path)
    assert calls["n"] > 3
    assert state.skipped_steps == 1 and state.rollbacks == 0 and state.converged
    assert all(torch.isfinite(p).all() for p in module.parameters())
    payload = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert payload["state"]["skipped_steps"] == 1


def test_diagnostics_restarts_and_the_unconverged_warning_reach_predict(tmp_path, capsys):
    """model.json records convergence; a deliberately unconverged run (--epochs 1) is reported as
    such by fit and again by predict, naming the flag to change; --restarts records every restart."""
    data = tmp_path / "cohort.nc"
    save_dataset(simulate("graph", 50, seed=9, noise_sd=0.02), data)
    run = tmp_path / "short"
    assert main(["fit", str(data), "--components", "diffusion,fisher_kpp", "--out", str(run), "--epochs", "1",
                 "--prior", "diffusivity=0.05,1", "--prior", "reaction=0.1,1"]) == 0
    captured = capsys.readouterr()
    assert "NOT converged" in captured.out and "--epochs" in captured.err
    conv = json.loads((run / "model.json").read_text())["convergence"]
    assert conv["converged"] is False and conv["stop_reason"] == "max_epochs" and conv["epochs_run"] == 1
    assert main(["predict", str(run), str(data), "--out", str(tmp_path / "post.nc")]) == 0
    err = capsys.readouterr().err
    assert "did NOT converge" in err and "--epochs" in err

    run2 = tmp_path / "restarts"
    assert main(["fit", str(data), "--components", "diffusion,fisher_kpp", "--out", str(run2), "--restarts", "2",
                 "--prior", "diffusivity=0.05,1", "--prior", "reaction=0.1,1"]) == 0
    conv = json.loads((run2 / "model.json").read_text())["convergence"]
    assert conv["converged"] is True and conv["restarts"] == 2 and len(conv["restart_elbos"]) == 2
    assert conv["best_validation_elbo"] == pytest.approx(max(conv["restart_elbos"]))
    assert 0 <= conv["restart_spread"] < 1.0  # nats per subject: both restarts reach the same fit
    assert math.isfinite(conv["elbo_slope_per_epoch"])
    assert main(["predict", str(run2), str(data), "--out", str(tmp_path / "post2.nc")]) == 0
    assert "did NOT converge" not in capsys.readouterr().err


def test_reweighted_laplace_matches_a_new_search(small_graph):
    """The closed-form Laplace approximation under another population prior agrees with searching
    again under that prior, for every (subject, component) that is well fitted."""
    ds, domain, data = small_graph
    module = graph_mixture_module(domain, ds).double()
    data = data.to("cpu", torch.float64)
    fit = search_modes(module, data, 0.02, tolerance=1e-4)
    old = Population(module.population_loc.clone(), module.population_scale.clone())
    new = Population(old.loc + torch.tensor([[0.3, 0.0], [-0.2, 0.3]], dtype=torch.float64),
                     old.scale * torch.tensor([[0.6, 1.0], [0.8, 0.7]], dtype=torch.float64))
    mean, cov, log_z = reweight_laplace(fit.mean, fit.jtj, 0.02 ** 2, fit.log_evidence, old, new, fit.has_rate)
    with torch.no_grad():
        module.population_loc.copy_(new.loc)
        module.population_scale.copy_(new.scale)
    again = search_modes(module, data, 0.02, tolerance=1e-4)
    good = torch.softmax(again.log_evidence, dim=1) > 0.5  # the component each subject follows
    assert good.sum() >= 55
    diff = (log_z - again.log_evidence)[good].abs()
    assert diff.median() < 0.005 and diff.max() < 0.15  # second-order exact; a few skewed posteriors
    assert (mean - again.mean)[good][:, 0].abs().median() < 0.005
    assert np.median(np.abs(cov[good][:, 0, 0].numpy() / again.cov[good][:, 0, 0].numpy() - 1)) < 0.02


def test_em_recovers_population_priors_that_differ_from_the_defaults():
    """Subjects whose log D and log r are Normal with moments far from the base prior's: the EM of
    the population prior recovers those moments (within sampling error), starting from the base."""
    rng = np.random.default_rng(3)
    n = 400
    true_loc, true_scale = np.array([-2.0, 0.5]), np.array([0.3, 0.2])
    theta = true_loc + true_scale * rng.standard_normal((n, 2))
    # Laplace approximations of precise measurements of theta (sd 0.05), made under the base prior
    priors = Priors(LogNormalPrior(0.01, 10.0), LogNormalPrior(0.01, 10.0))
    base = Population(torch.tensor([[priors.diffusivity.loc, priors.reaction.loc]], dtype=torch.float64),
                      torch.tensor([[priors.diffusivity.scale, priors.reaction.scale]], dtype=torch.float64))
    obs = theta + 0.05 * rng.standard_normal((n, 2))
    lam = 1 / 0.05 ** 2
    prec = lam + 1 / base.scale.numpy()[0] ** 2
    mode = (lam * obs + base.loc.numpy()[0] / base.scale.numpy()[0] ** 2) / prec
    jtj = torch.tensor([[[lam, 0.0, lam]]] * n, dtype=torch.float64)  # variance 1: Lambda = J^T J
    log_z = torch.zeros(n, 1, dtype=torch.float64)
    has_rate = torch.tensor([True])
    pop, weights, resp, _ = em_population(torch.tensor(mode[:, None, :]), jtj, 1.0, log_z, base, priors, has_rate,
                                          n_iter=200)
    se_loc = true_scale / math.sqrt(n)
    assert np.all(np.abs(pop.loc.numpy()[0] - theta.mean(0)) < 4 * se_loc)
    assert np.allclose(pop.scale.numpy()[0], np.sqrt(theta.var(0) + 0.05 ** 2), rtol=0.1)
    assert weights.item() == pytest.approx(1.0)


def test_tied_em_is_the_pooled_map_of_every_subtype():
    """Tied population priors: one (mu, tau) per coordinate shared by both components, fitted from
    every subject whatever its subtype. At the EM's fixed point the shared hyperparameters are the
    MAP of the pooled expected complete-data log density (checked against scipy on the same E-step),
    and they recover the common population of subjects split between two mechanisms; untied EM
    gives each mechanism its own."""
    from scipy.optimize import minimize

    from pyrovae_pde.inference.population import HYPER_LOG_SCALE_SD, HYPER_LOG_SCALE_SHIFT, base_hyperprior

    rng = np.random.default_rng(4)
    n = 400
    true_loc, true_scale = np.array([-1.5, 0.2]), np.array([0.4, 0.3])
    theta = true_loc + true_scale * rng.standard_normal((n, 2))
    owner = rng.integers(0, 2, n)  # each subject's mechanism, decided by its evidence below
    priors = Priors(LogNormalPrior(0.01, 10.0), LogNormalPrior(0.01, 10.0))
    base = Population(torch.tensor([[priors.diffusivity.loc, priors.reaction.loc]] * 2, dtype=torch.float64),
                      torch.tensor([[priors.diffusivity.scale, priors.reaction.scale]] * 2, dtype=torch.float64))
    lam = 1 / 0.05 ** 2
    obs = theta + 0.05 * rng.standard_normal((n, 2))
    prec = lam + 1 / base.scale.numpy()[0] ** 2
    mode = (lam * obs + base.loc.numpy()[0] / base.scale.numpy()[0] ** 2) / prec
    mean = torch.tensor(np.repeat(mode[:, None, :], 2, axis=1))
    jtj = torch.tensor([[[lam, 0.0, lam]] * 2] * n, dtype=torch.float64)
    log_z = torch.tensor(np.where(np.arange(2)[None, :] == owner[:, None], 0.0, -30.0))
    has_rate = torch.tensor([True, True])
    pop, _, resp, _ = em_population(mean, jtj, 1.0, log_z, base, priors, has_rate, n_iter=300, tied=True,
                                    tolerance=1e-10)
    assert torch.equal(pop.loc[0], pop.loc[1]) and torch.equal(pop.scale[0], pop.scale[1])
    assert np.all(np.abs(pop.loc.numpy()[0] - theta.mean(0)) < 4 * true_scale / math.sqrt(n))
    assert np.allclose(pop.scale.numpy()[0], np.sqrt(theta.var(0) + 0.05 ** 2), rtol=0.1)

    # the exact M-step: maximise sum_ik r_ik E[log N(theta_ik | mu, tau^2)] + log hyperprior by scipy
    m_new, cov, _ = reweight_laplace(mean, jtj, 1.0, log_z, base, pop, has_rate)
    m0, s0 = (t.numpy()[0] for t in base_hyperprior(priors, 2))
    r = resp.numpy()
    for c in (0, 1):
        m, v = m_new[..., c].numpy(), cov[..., c, c].numpy()

        def negative(x, c=c, m=m, v=v):
            mu, u = x
            expected = -(r * (u + (v + (m - mu) ** 2) * np.exp(-2 * u) / 2)).sum()
            hyper = -0.5 * ((mu - m0[c]) / s0[c]) ** 2 - 0.5 * (
                (u - np.log(s0[c]) - HYPER_LOG_SCALE_SHIFT) / HYPER_LOG_SCALE_SD) ** 2
            return -(expected + hyper)
        best = minimize(negative, [0.0, 0.0], method="Nelder-Mead", options={"xatol": 1e-9, "fatol": 1e-12,
                                                                                 "maxiter": 4000}).x
        assert float(pop.loc[0, c]) == pytest.approx(best[0], abs=1e-4)
        assert math.log(float(pop.scale[0, c])) == pytest.approx(best[1], abs=1e-4)

    # untied: each mechanism's own population, from its own half of the subjects
    untied, _, _, _ = em_population(mean, jtj, 1.0, log_z, base, priors, has_rate, n_iter=300)
    for k in (0, 1):
        own = theta[owner == k]
        assert np.all(np.abs(untied.loc.numpy()[k] - own.mean(0)) < 4 * true_scale / math.sqrt(len(own)))
    assert not torch.equal(untied.loc[0], untied.loc[1])


def test_a_tied_fit_shares_its_populations_and_keeps_them_on_reload(small_graph, tmp_path):
    """``tie_population=True``: after fitting, both mechanisms carry the same population of log D,
    the run says its populations are tied, and a saved and reloaded run keeps both."""
    ds, _, _ = small_graph
    model = SubtypeModel("fisher_kpp,diffusion", priors=GRAPH_PRIORS).fit(ds, epochs=3, seed=0,
                                                                          tie_population=True, **QUICK)
    module = model.module_
    assert bool(module.population_tied) and bool(module.population_learned)
    assert torch.equal(module.population_loc[0, 0], module.population_loc[1, 0])
    assert torch.equal(module.population_scale[0, 0], module.population_scale[1, 0])
    assert not torch.equal(module.population_loc[0, 0], module._base_population()[0][0, 0])  # learned, not base
    model.save(tmp_path / "run")
    again = SubtypeModel.load(tmp_path / "run").module_
    assert bool(again.population_tied)
    recorded = json.loads((tmp_path / "run" / "model.json").read_text())["domain"]
    assert recorded["solver"] == "spectral" and recorded["n_nodes"] == module.domain.n_nodes  # a 68-node graph
    assert torch.equal(again.population_loc, module.population_loc)
