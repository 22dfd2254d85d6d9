"""The probabilistic model: exact enumeration, closed-form responsibilities, priors, training
mechanics (checkpoints, resume, NaN guard, seeds), the API and the fit/predict CLI."""
from __future__ import annotations

import json
import math

import numpy as np
import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import TraceEnum_ELBO

from pyrovae_pde.data import cohort_tensors, domain_from_dataset, save_dataset, simulate
from pyrovae_pde.data.contract import describe, load_schema
from pyrovae_pde.inference.posterior import global_means
from pyrovae_pde.inference.train import TrainConfig, TrainingDivergedError, train
from pyrovae_pde.interfaces.api import ModelError, SubtypeModel
from pyrovae_pde.interfaces.cli import main
from pyrovae_pde.model.module import MAX_PLATE_NESTING, MixturePDE
from pyrovae_pde.model.priors import Z95, LogNormalPrior

COMPONENTS = ("fisher_kpp", "saturating", "zeldovich")
GRAPH_PRIORS = {"diffusivity": (0.05, 1.0), "reaction": (0.1, 1.0)}
# no plateau stop and no amortization stage (not checkpointed: it follows the fit) in mechanics tests
FAST = dict(warmup_sleep_steps=30, progress=False, min_epochs=50, amortize_steps=0)


@pytest.fixture(scope="module")
def grid_data():
    ds = simulate("paper-grid", 12, seed=3, noise_sd=0.05)
    domain = domain_from_dataset(ds)
    return ds, domain, cohort_tensors(ds, domain, dtype=torch.float64)


@pytest.fixture(scope="module")
def graph_cohorts():
    return (simulate("graph", 160, seed=11, noise_sd=0.02),
            simulate("graph", 100, seed=12, noise_sd=0.02))


@pytest.fixture(scope="module")
def graph_model(graph_cohorts):
    train_ds, _ = graph_cohorts
    return SubtypeModel(("diffusion", "fisher_kpp"), priors=GRAPH_PRIORS).fit(
        train_ds, epochs=15, seed=0, warmup_sleep_steps=300, progress=False)


def _module(domain, components=COMPONENTS, n_visits=3):
    torch.manual_seed(0)
    return MixturePDE(domain, components, n_visits, time_scale=24.0).double()


def _guide_trace(domain, data, seed):
    """A fresh module, its model/guide arguments, and one guide trace drawn with Pyro seed ``seed``."""
    module = _module(domain)
    args = (data.signal, data.times, data.observed)
    pyro.set_rng_seed(seed)
    return module, args, poutine.trace(module.guide).get_trace(*args)


def test_prior_interval_is_central_95_percent():
    prior = LogNormalPrior(0.01, 1.0)
    d = torch.distributions.LogNormal(prior.loc, prior.scale)
    assert float(d.icdf(torch.tensor(0.025))) == pytest.approx(0.01, rel=1e-6)
    assert float(d.icdf(torch.tensor(0.975))) == pytest.approx(1.0, rel=1e-6)
    assert prior.scale == pytest.approx(math.log(100) / (2 * Z95))
    with pytest.raises(ValueError, match="0 < LO < HI"):
        LogNormalPrior(1.0, 0.5)


def test_guide_never_samples_the_subtype_and_model_enumerates_it(grid_data):
    _, domain, data = grid_data
    module, args, guide_trace = _guide_trace(domain, data, seed=0)
    assert "subtype" not in guide_trace.nodes
    assert guide_trace.nodes["diffusivity"]["value"].shape == (3, 12)  # (K, B)
    assert guide_trace.nodes["reaction"]["value"].shape == (3, 12)
    enum_model = poutine.enum(module.model, first_available_dim=-MAX_PLATE_NESTING - 1)
    trace = poutine.trace(poutine.replay(enum_model, trace=guide_trace)).get_trace(*args)
    assert trace.nodes["subtype"]["value"].shape == (3, 1, 1)  # enumerated over K on dim -3
    assert trace.nodes["signal"]["fn"].batch_shape == (3, 1, 12)


def test_trace_enum_elbo_equals_the_exactly_marginalised_mixture(grid_data):
    """The TraceEnum_ELBO of one guide draw equals the hand-marginalised log-sum-exp over subtypes."""
    _, domain, data = grid_data
    module, args, guide_trace = _guide_trace(domain, data, seed=1)
    elbo = TraceEnum_ELBO(max_plate_nesting=MAX_PLATE_NESTING)
    loss = elbo.loss(poutine.replay(module.model, trace=guide_trace), poutine.replay(module.guide, trace=guide_trace),
                     *args)

    nodes = guide_trace.nodes
    weights, noise = nodes["weights"]["value"], nodes["noise_scale"]["value"]
    diffusivity, reaction = nodes["diffusivity"]["value"].T, nodes["reaction"]["value"].T  # (B, K)
    loglik = module.log_likelihood_components(data.signal, data.times, data.observed, diffusivity, reaction, noise)
    marginal = torch.logsumexp(torch.log(weights) + loglik, dim=-1).sum()
    p = module.priors
    log_prior = (torch.distributions.Dirichlet(torch.ones(3, dtype=torch.float64)).log_prob(weights)
                 + torch.distributions.LogNormal(math.log(p.noise_median), p.noise_log_sd).log_prob(noise)
                 + torch.distributions.LogNormal(p.diffusivity.loc, p.diffusivity.scale).log_prob(diffusivity).sum()
                 + torch.distributions.LogNormal(p.reaction.loc, p.reaction.scale).log_prob(reaction).sum())
    log_q = sum(site["fn"].log_prob(site["value"]).sum() for name, site in nodes.items()
                if site["type"] == "sample")
    expected = -(marginal + log_prior - log_q)
    assert loss == pytest.approx(float(expected), rel=1e-9, abs=1e-6)


def test_closed_form_responsibilities_match_pyro_marginals(grid_data):
    _, domain, data = grid_data
    module, args, guide_trace = _guide_trace(domain, data, seed=2)
    replayed_guide = poutine.replay(module.guide, trace=guide_trace)
    marginals = TraceEnum_ELBO(max_plate_nesting=MAX_PLATE_NESTING).compute_marginals(
        poutine.replay(module.model, trace=guide_trace), replayed_guide, *args)
    pyro_probs = marginals["subtype"].probs.reshape(-1, 3) if marginals["subtype"].probs.dim() > 1 \
        else marginals["subtype"].probs
    nodes = guide_trace.nodes
    loglik = module.log_likelihood_components(data.signal, data.times, data.observed,
                                              nodes["diffusivity"]["value"].T, nodes["reaction"]["value"].T,
                                              nodes["noise_scale"]["value"])
    closed = torch.softmax(torch.log(nodes["weights"]["value"]) + loglik, dim=-1)
    assert torch.allclose(pyro_probs.reshape(closed.shape), closed, atol=1e-8)


def test_missing_visits_do_not_enter_the_likelihood(grid_data):
    _, domain, data = grid_data
    module = _module(domain)
    d = torch.full((12, 3), 0.3, dtype=torch.float64)
    r = torch.full((12, 3), 0.05, dtype=torch.float64)
    observed = data.observed.clone()
    observed[:4, 1] = False
    times = data.times.clone()
    times[:4, 1] = float("nan")
    garbage = data.signal.clone()
    garbage[:4, 1] = 123.0
    noise = torch.tensor(0.05, dtype=torch.float64)
    a = module.log_likelihood_components(data.signal, times, observed, d, r, noise)
    b = module.log_likelihood_components(garbage, times, observed, d, r, noise)
    assert torch.equal(a, b)
    full = module.log_likelihood_components(data.signal, data.times, data.observed, d, r, noise)
    assert not torch.allclose(a[:4], full[:4])  # dropping a visit changes those subjects
    assert torch.allclose(a[4:], full[4:])


def test_diffusion_component_has_no_reaction_site(grid_data):
    _, domain, data = grid_data
    module = _module(domain, ("diffusion", "fisher_kpp"))
    trace = poutine.trace(module.guide).get_trace(data.signal, data.times, data.observed)
    assert trace.nodes["diffusivity"]["value"].shape == (2, 12)
    assert trace.nodes["reaction"]["value"].shape == (1, 12)  # only fisher_kpp has a rate
    baseline = _module(domain, ("diffusion",))
    trace = poutine.trace(baseline.guide).get_trace(data.signal, data.times, data.observed)
    assert "reaction" not in trace.nodes


def test_a_mechanisms_fields_in_the_mixture_are_its_fields_alone(grid_data):
    # Each (subject, component) is solved with the step counts of max(its own rate, the prior's
    # median): a mechanism's fields do not depend on the subject's other components' rates (drawn
    # on both sides of the floor here), and a search's step rates below the floor change nothing.
    from pyrovae_pde.physics import solve_active

    _, domain, data = grid_data
    module = _module(domain)
    assert module.step_rate_floor == pytest.approx(math.exp(module.priors.reaction.loc))
    rng = np.random.default_rng(0)
    n = data.n_subjects
    d = torch.tensor(rng.uniform(0.01, 1.0, (n, 3)))
    r = torch.tensor(np.exp(rng.uniform(math.log(0.005), math.log(1.0), (n, 3))))
    u0, times = data.signal[:, 0], data.times
    mixture = module.predict(u0, times, d, r)
    for k, term in enumerate(module.terms):
        alone = solve_active(domain, u0, times, d[:, k:k + 1], r[:, k:k + 1], [term], module.solver_settings())
        np.testing.assert_allclose(mixture[:, k].numpy(), alone[:, 0].numpy(), rtol=0, atol=1e-12)
    low = torch.full((n, 3), 0.5 * module.step_rate_floor)
    np.testing.assert_allclose(module.predict(u0, times, d, r, step_rates=low).numpy(),
                               module.predict(u0, times, d, r, step_rates=torch.zeros(n, 3)).numpy(), rtol=0, atol=0)
    # Step rates above the floor take more steps, and those change the fields (at the discretisation's level)
    high = r.clamp(min=4.0 * module.step_rate_floor)
    change = (module.predict(u0, times, d, r, step_rates=high) - mixture).abs().max()
    assert 0 < float(change) < 1e-2


def test_sleep_warm_up_learns_the_parameters_of_simulated_subjects(grid_data):
    """A short sleep phase makes the encoder's D estimate track the truth on fresh simulations."""
    from scipy.stats import spearmanr

    _, domain, data = grid_data
    torch.manual_seed(0)
    module = MixturePDE(domain, COMPONENTS, 3, time_scale=24.0)
    data32 = data.to("cpu", torch.float32)
    u0, times, observed = data32.signal[:, 0], data32.times, data32.observed
    opt = torch.optim.Adam(module.encoder.parameters(), lr=3e-3)
    for _ in range(300):
        loss = module.sleep_loss(u0, times, observed, 0.02)
        opt.zero_grad()
        loss.backward()
        opt.step()
    fields, diffusivity, _ = module.simulate_prior(u0.repeat(4, 1), times.repeat(4, 1), observed.repeat(4, 1), 0.02)
    with torch.no_grad():
        d_loc = module.encode(fields[:, 0], times.repeat(4, 1), observed.repeat(4, 1))[0][:, 0]
    assert spearmanr(d_loc.numpy(), diffusivity[:, 0].numpy())[0] > 0.8


def test_resume_continues_from_the_checkpoint(tmp_path, graph_training):
    data, fresh = graph_training

    interrupted = fresh()
    first = train(interrupted, data, TrainConfig(epochs=2, seed=4, **FAST), checkpoint_dir=tmp_path)
    payload = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert payload["state"]["epoch"] == 2 and payload["wake_optimizer"]["state"]  # Adam moments are kept
    # Nothing left to do: resuming a finished run restores its best parameters unchanged.
    done = fresh()
    state = train(done, data, TrainConfig(epochs=2, seed=4, **FAST), checkpoint_dir=tmp_path, resume=True)
    assert state.history == first.history
    for name, value in done.state_dict().items():
        assert torch.equal(value, interrupted.state_dict()[name]), name
    # Resuming to 3 epochs keeps the first two epochs' record and runs only the third.
    resumed = fresh()
    state = train(resumed, data, TrainConfig(epochs=3, seed=4, **FAST), checkpoint_dir=tmp_path, resume=True)
    assert state.epoch == 3 and state.history[:2] == first.history and state.history[2]["epoch"] == 2
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(fresh(), data, TrainConfig(epochs=3, **FAST), checkpoint_dir=tmp_path / "empty", resume=True)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_state(tmp_path):
    ds = simulate("graph", 30, seed=6, noise_sd=0.02)
    domain = domain_from_dataset(ds)
    data = cohort_tensors(ds, domain)
    module = MixturePDE(domain, ("fisher_kpp",), ds.sizes["visit"], time_scale=5.0)
    train(module, data, TrainConfig(epochs=1, seed=0, **FAST), checkpoint_dir=tmp_path)
    good = {k: v.clone() for k, v in module.state_dict().items()}
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["best_module"]
    data.signal[:, 1] = float("nan")  # poisons every later-visit likelihood: every epoch rolls back
    config = TrainConfig(epochs=2 + TrainConfig.max_rollbacks, seed=0, **FAST)
    with pytest.raises(TrainingDivergedError, match="last good checkpoint is kept"):
        train(module, data, config, checkpoint_dir=tmp_path, resume=True)
    for name, value in module.state_dict().items():
        assert torch.equal(value, good[name]), name
    kept = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["best_module"]
    for name, value in kept.items():
        assert torch.equal(value, saved[name]), name


def test_graph_fit_recovers_subtypes_and_parameters_on_new_subjects(graph_model, graph_cohorts):
    _, test_ds = graph_cohorts
    post = graph_model.posterior(test_ds)
    from pyrovae_pde.inference.evaluation import recovery_metrics

    m = recovery_metrics(post, test_ds)
    # Small scale (160 subjects, 15 epochs); the full-scale targets are in benchmarks/RESULTS.md.
    assert m["accuracy"] >= 0.8
    assert m["spearman_diffusivity"] >= 0.7
    assert np.allclose(post["subtype_prob"].sum("subtype"), 1.0)
    assert (post["reaction"].sel(subtype="diffusion").isnull()).all()
    assert (post["diffusivity_q05"] <= post["diffusivity"]).all()
    assert (post["diffusivity"] <= post["diffusivity_q95"]).all()
    assert post.attrs["n_particles"] == 128  # a 68-node graph: importance-sampled by default


def test_default_posterior_is_laplace_alone_on_a_voxel_grid(grid_data):
    from pyrovae_pde.inference.posterior import posterior_dataset

    _, domain, data = grid_data
    post = posterior_dataset(_module(domain).float(), data.to("cpu", torch.float32))
    assert domain.n_nodes > 256 and post.attrs["n_particles"] == 0 and post.attrs["refined"] == 1
    with pytest.raises(ValueError, match="n_particles must be >= 1"):
        posterior_dataset(_module(domain).float(), data.to("cpu", torch.float32), refine=False, n_particles=0)


def test_posterior_matches_its_schema_and_round_trips_through_save_load(graph_model, graph_cohorts, tmp_path):
    import jsonschema

    _, test_ds = graph_cohorts
    post = graph_model.posterior(test_ds, seed=3)
    jsonschema.validate(describe(post), load_schema("posterior-v1"))
    graph_model.save(tmp_path / "run")
    loaded = SubtypeModel.load(tmp_path / "run")
    again = loaded.posterior(test_ds, seed=3)
    np.testing.assert_allclose(again["subtype_prob"].values, post["subtype_prob"].values, atol=1e-6)
    np.testing.assert_allclose(again["diffusivity"].values, post["diffusivity"].values, rtol=1e-6)
    assert list(again["subtype"].values) == ["diffusion", "fisher_kpp"]


def test_same_seed_same_fit_different_seed_different_fit():
    ds = simulate("graph", 30, seed=8, noise_sd=0.02)
    fits = [SubtypeModel(("fisher_kpp",), priors=GRAPH_PRIORS).fit(ds, epochs=1, seed=s, **FAST) for s in (1, 1, 2)]
    posts = [f.posterior(ds) for f in fits]
    np.testing.assert_array_equal(posts[0]["diffusivity"].values, posts[1]["diffusivity"].values)
    assert not np.allclose(posts[0]["diffusivity"].values, posts[2]["diffusivity"].values)
    assert np.allclose(posts[0]["subtype_prob"].values, 1.0)  # K = 1: the single-PDE baseline


def test_prediction_on_another_domain_is_refused(graph_model):
    other = simulate("paper-grid", 3, seed=0)
    with pytest.raises(ModelError, match="differs from the one this model was fitted on"):
        graph_model.posterior(other)


def test_unknown_component_lists_the_registered_ones():
    with pytest.raises(KeyError, match="registered terms are: diffusion, fisher_kpp, saturating, zeldovich"):
        SubtypeModel(("fisher_kpp", "gompertz"))


def test_weights_and_noise_posterior_are_sensible(graph_model, graph_cohorts):
    train_ds, _ = graph_cohorts
    weights, noise = global_means(graph_model.module_)
    freq = [(train_ds["true_subtype"].values == c).mean() for c in ("diffusion", "fisher_kpp")]
    assert np.abs(weights.numpy() - np.array(freq)).max() < 0.15
    assert 0.01 < float(noise) < 0.05  # simulated with noise sd 0.02


# ---------------------------------------------------------------------- CLI

def test_cli_fit_predict_round_trip(tmp_path, capsys):
    data = tmp_path / "train.nc"
    save_dataset(simulate("graph", 40, seed=9, noise_sd=0.02), data)
    run = tmp_path / "run"
    code = main(["fit", str(data), "--components", "diffusion,fisher_kpp", "--out", str(run), "--epochs", "1",
                 "--prior", "diffusivity=0.05,1", "--prior", "reaction=0.1,1"])
    assert code == 0
    config = json.loads((run / "model.json").read_text())
    assert config["components"] == ["diffusion", "fisher_kpp"]
    assert config["priors"]["reaction"] == {"low": 0.1, "high": 1.0}
    out = tmp_path / "post.nc"
    assert main(["predict", str(run), str(data), "--out", str(out)]) == 0
    import xarray as xr

    post = xr.load_dataset(out, engine="h5netcdf")
    assert post.sizes["subject"] == 40 and list(post["subtype"].values) == ["diffusion", "fisher_kpp"]
    np.testing.assert_allclose(post["subtype_prob"].sum("subtype"), 1.0, atol=1e-9)
    assert "subtype accuracy" in capsys.readouterr().out


def test_cli_errors_are_one_clear_line(tmp_path, capsys):
    bad = tmp_path / "bad.nc"
    ds = simulate("graph", 5, seed=1)
    ds["time"][2, 0] = np.nan  # first visit missing
    ds["signal"][2, 0] = np.nan
    ds.to_netcdf(bad, engine="h5netcdf")
    assert main(["fit", str(bad), "--components", "fisher_kpp", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.nc" in err[0] and "sub-0002" in err[0] and "first visit" in err[0]
    good = tmp_path / "good.nc"
    save_dataset(simulate("graph", 5, seed=1), good)
    assert main(["fit", str(good), "--components", "fisher_kpp,nope", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "unknown reaction term 'nope'" in err and "Traceback" not in err
    assert main(["fit", str(good), "--components", "fisher_kpp", "--out", str(tmp_path / "r"),
                 "--prior", "diffusivity=1,0.1"]) == 2
    assert "0 < LO < HI" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "nowhere"), str(bad), "--out", str(tmp_path / "p.nc")]) == 2
    assert "no model.json" in capsys.readouterr().err
