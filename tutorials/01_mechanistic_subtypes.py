"""Tutorial 1: learning mechanistic subtypes from a simulated cohort.

Run it as a script (a few minutes on a laptop CPU):

    .venv/bin/python tutorials/01_mechanistic_subtypes.py

It walks through what a teacher of probabilistic subtyping would show: the data contract, the
physics, the generative model with an enumerated subtype, fitting, the posterior of new subjects,
and what calibration means here.
"""
import torch

from pyrovae_pde import SubtypeModel, simulate
from pyrovae_pde.data import domain_from_dataset
from pyrovae_pde.inference.evaluation import format_metrics, recovery_metrics
from pyrovae_pde.physics import solve

# 1. A cohort is an xarray Dataset: signal (subject, visit, y, x), time (subject, visit), a brain
#    mask, and -- for simulated data -- the ground truth. NaN marks a missing visit.
train = simulate("paper-grid", 300, seed=1, noise_sd=0.05)
new = simulate("paper-grid", 200, seed=2, noise_sd=0.05)
print(train)

# 2. The physics: one call solves every subject under every mechanism (N subjects x K components).
domain = domain_from_dataset(train)
u0 = torch.as_tensor(train["signal"].values[:4, 0])                     # (4, 32, 32)
times = torch.as_tensor(train["time"].values[:4])                       # (4, 3)
diffusivity = torch.full((4, 3), 0.3, dtype=torch.float64)              # (N, K)
reaction = torch.full((4, 3), 0.08, dtype=torch.float64)
fields = solve(domain, u0, times, diffusivity, reaction, reactions=("fisher_kpp", "saturating", "zeldovich"))
print("fields", tuple(fields.shape), "= (subject, component, visit, y, x)")
print("total burden at the last visit, per mechanism:", fields[0, :, -1].sum(dim=(-1, -2)).numpy().round(1))

# 3. Fit the mixture. The subtype is summed out exactly by TraceEnum_ELBO; each subject's posterior
#    of D and r under every mechanism is a Laplace approximation found from the encoder's guess,
#    and the fit stops at the plateau of its validation ELBO. It says whether it converged, and
#    whether the priors (here derived from the cohort's follow-up) conflict with the data.
model = SubtypeModel(components=["fisher_kpp", "saturating", "zeldovich"])
model.fit(train, seed=0)
print("converged:", model.converged_, "| convergence:", {k: v for k, v in model.convergence_.items()
                                                          if k in ("stop_reason", "epochs_run", "rollbacks")})
# The population prior of log r is learned from the cohort and shared by the mechanisms (tied; the
# default), so a subject's subtype is decided by how its scans change, not by where its r lies.
print("learned population prior of log r (mean, sd):",
      round(float(model.module_.population_loc[0, 1]), 2), round(float(model.module_.population_scale[0, 1]), 2))

# 4. Posterior for NEW subjects: subtype probabilities and parameter posteriors, as labelled data.
#    Each subject's guide posterior is refined into a Laplace approximation per mechanism (a
#    few Levenberg-Marquardt steps); `n_particles=N` would importance-sample it with N solves per
#    subject and mechanism (the default on small domains such as region graphs).
posterior = model.posterior(new)
print(posterior[["subtype_prob", "diffusivity", "diffusivity_q05", "diffusivity_q95"]].isel(subject=slice(0, 3)))
print(format_metrics(recovery_metrics(posterior, new)))

# 5. Calibration: among subjects whose top probability is about p, about a fraction p should be
#    classified right. Subjects with small r*T are the hard ones: their mechanisms look alike.
top = posterior["subtype_prob"].max("subtype").values
right = posterior["subtype_prob"].idxmax("subtype").values == new["true_subtype"].values
for lo, hi in ((0.0, 0.6), (0.6, 0.9), (0.9, 1.01)):
    sel = (top >= lo) & (top < hi)
    if sel.any():
        print(f"top probability in [{lo}, {hi}): {sel.sum():4d} subjects, accuracy {right[sel].mean():.2f}")
rt = new["true_reaction"].values * 24.0
print("accuracy for r*T < 0.75:", right[rt < 0.75].mean().round(2), " r*T >= 0.75:", right[rt >= 0.75].mean().round(2))
