"""The CUDA paths: the solver, fit, predict (refined and guide-only), checkpoints and the CLI.

Skipped where torch sees no GPU (CI has none); run on a GPU machine with
``python -m pytest tests/test_cuda.py``. Results on CUDA must agree with the same computation
on CPU: the solver to rounding, the posterior of one fitted model to float32 tolerances.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pyrovae_pde.data import cohort_tensors, domain_from_dataset, save_dataset, simulate
from pyrovae_pde.inference.train import TrainConfig, train
from pyrovae_pde.interfaces.api import SubtypeModel
from pyrovae_pde.interfaces.cli import main
from pyrovae_pde.physics import solve_active

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")

GRAPH_PRIORS = {"diffusivity": (0.05, 1.0), "reaction": (0.1, 1.0)}
FAST = dict(warmup_sleep_steps=30, progress=False)


@pytest.mark.parametrize("scenario", ["paper-grid", "graph"])
def test_solver_on_cuda_matches_cpu_values_and_gradients(scenario):
    ds = simulate(scenario, 6, seed=2, noise_sd=0.0)
    domain = domain_from_dataset(ds)
    data = cohort_tensors(ds, domain, dtype=torch.float64)
    terms = ("diffusion", "fisher_kpp", "saturating", "zeldovich")
    gen = torch.Generator().manual_seed(0)
    d = 0.05 + 0.5 * torch.rand(6, len(terms), generator=gen, dtype=torch.float64)
    r = 0.02 + 0.2 * torch.rand(6, len(terms), generator=gen, dtype=torch.float64)
    results = {}
    for device in ("cpu", "cuda"):
        dd = d.clone().to(device).requires_grad_()  # fresh leaves on each device
        rr = r.clone().to(device).requires_grad_()
        fields = solve_active(domain, data.signal[:, 0].to(device), data.times.to(device), dd, rr, terms)
        fields.square().sum().backward()
        results[device] = (fields.detach().cpu(), dd.grad.cpu(), rr.grad.cpu())
    for cpu, cuda in zip(results["cpu"], results["cuda"]):
        torch.testing.assert_close(cuda, cpu, rtol=1e-9, atol=1e-10)


@pytest.fixture(scope="module")
def cuda_graph_model():
    """The CPU suite's graph model (tests/test_model.py), fitted on CUDA."""
    train_ds = simulate("graph", 160, seed=11, noise_sd=0.02)
    model = SubtypeModel(("diffusion", "fisher_kpp"), priors=GRAPH_PRIORS)
    return model.fit(train_ds, epochs=15, seed=0, device="cuda", warmup_sleep_steps=300, progress=False)


def test_fit_on_cuda_returns_a_cpu_model_that_recovers_subtypes(cuda_graph_model):
    from pyrovae_pde.inference.evaluation import recovery_metrics

    module = cuda_graph_model.module_
    assert all(p.device.type == "cpu" and torch.isfinite(p).all() for p in module.parameters())
    test_ds = simulate("graph", 100, seed=12, noise_sd=0.02)
    metrics = recovery_metrics(cuda_graph_model.posterior(test_ds, device="cuda"), test_ds)
    # the same bounds as the CPU fit in tests/test_model.py
    assert metrics["accuracy"] >= 0.8 and metrics["spearman_diffusivity"] >= 0.7


@pytest.mark.parametrize("refine, n_particles", [(True, None), (True, 16), (False, None)])
def test_posterior_on_cuda_matches_posterior_on_cpu(cuda_graph_model, refine, n_particles):
    test_ds = simulate("graph", 100, seed=12, noise_sd=0.02)
    on_cpu = cuda_graph_model.posterior(test_ds, device="cpu", refine=refine, seed=1, n_particles=n_particles)
    on_cuda = cuda_graph_model.posterior(test_ds, device="cuda", refine=refine, seed=1, n_particles=n_particles)
    assert all(p.device.type == "cpu" for p in cuda_graph_model.module_.parameters())
    # float32 solves in a few Levenberg-Marquardt iterations: the summaries agree to a tenth of
    # the posterior sd (relative agreement fails only where a wrong component drives D far below
    # its prior, e.g. D = 0.004 +- 0.002, and float32 round-off moves the search's last step)
    np.testing.assert_allclose(on_cuda["subtype_prob"], on_cpu["subtype_prob"], atol=5e-3)
    for name in ("diffusivity", "reaction"):
        sd = on_cpu[name + "_sd"].values
        for suffix in ("", "_q05", "_q95"):
            diff = np.abs(on_cuda[name + suffix].values - on_cpu[name + suffix].values)
            assert np.all((diff <= 0.1 * sd) | np.isnan(sd)), (name + suffix, float(np.nanmax(diff / sd)))
    np.testing.assert_allclose(on_cuda["weights"], on_cpu["weights"], rtol=1e-6)


def test_checkpoint_written_on_cuda_resumes_on_cpu(tmp_path, graph_training):
    data, fresh = graph_training

    first = train(fresh(), data, TrainConfig(epochs=1, seed=4, device="cuda", **FAST), checkpoint_dir=tmp_path)
    resumed = fresh()
    state = train(resumed, data, TrainConfig(epochs=2, seed=4, device="cpu", **FAST), checkpoint_dir=tmp_path,
                  resume=True)
    assert state.epoch == 2 and state.history[:1] == first.history
    assert all(p.device.type == "cpu" and torch.isfinite(p).all() for p in resumed.parameters())


def test_cli_fit_and_predict_on_cuda(tmp_path):
    data = tmp_path / "train.nc"
    save_dataset(simulate("graph", 30, seed=9, noise_sd=0.02), data)
    run = tmp_path / "run"
    assert main(["fit", str(data), "--components", "diffusion,fisher_kpp", "--out", str(run), "--epochs", "1",
                 "--device", "cuda", "--prior", "diffusivity=0.05,1", "--prior", "reaction=0.1,1"]) == 0
    assert json.loads((run / "model.json").read_text())["components"] == ["diffusion", "fisher_kpp"]
    out = tmp_path / "post.nc"
    assert main(["predict", str(run), str(data), "--out", str(out), "--device", "cuda"]) == 0
    import xarray as xr

    post = xr.load_dataset(out, engine="h5netcdf")
    np.testing.assert_allclose(post["subtype_prob"].sum("subtype"), 1.0, atol=1e-9)
