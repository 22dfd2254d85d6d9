"""Simulation-based calibration (Talts et al. 2018) of the per-subject posteriors of a fitted mixture.

If subjects are drawn from the prior the posterior is computed under, theta ~ p(theta), x ~ p(x | theta),
and L draws come from the exact posterior p(theta | x), the rank of the true theta among the L draws
is uniform on {0, ..., L}. ``simulation_based_calibration`` draws each simulated subject's subtype
from the fitted weights and (log D, log r) from that subtype's fitted population prior, solves its
field from a reference subject's first scan over that subject's visit times (with Gaussian noise at
the model's observation sd on the later visits), computes the posteriors of the whole simulated
cohort as ``posterior.posterior_dataset`` does (Laplace approximation refined from the encoder,
importance-sampled on small domains) and ranks the true values among draws from the posterior under
the TRUE subtype. Histograms that are U-shaped mean posteriors too narrow (over-confident), humped
too wide, sloped biased. The rank statistic and its chi-square test (``ranks_of`` and
``rank_uniformity``) are pure functions of arrays.
"""
from __future__ import annotations

import numpy as np
import torch
import xarray as xr
from scipy import stats as sps

from ..data.cohort import CohortTensors, cohort_tensors, domain_from_dataset, pad_visits
from ..errors import InputError
from ..model.likelihood import observation_sd
from ..model.module import MixturePDE
from ..physics import solve_active
from .encoding import encode_amortized_cohort, global_means
from .posterior import SMALL_DOMAIN_NODES, SMALL_DOMAIN_PARTICLES, refined_fit, subtype_log_probs

PARAMETERS = ("log_diffusivity", "log_reaction")
MIN_EXPECTED = 5  # smallest expected count per bin of the chi-square test


# ---------------------------------------------------------------------------------------------- rank statistic
def ranks_of(truth: np.ndarray, draws: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """Rank of each ``truth`` (S,) among its row of ``draws`` (S, L): the number of draws below it,
    ties split at random; in {0, ..., L}, uniform when the draws come from the exact posterior.
    NaN where the truth is NaN."""
    truth, draws = np.asarray(truth, dtype=float), np.asarray(draws, dtype=float)
    if draws.ndim != 2 or truth.shape != draws.shape[:1]:
        raise InputError(f"ranks_of: truth (S,) and draws (S, L) expected, got {truth.shape} and {draws.shape}")
    rng = rng or np.random.default_rng(0)
    below = (draws < truth[:, None]).sum(axis=1)
    ties = (draws == truth[:, None]).sum(axis=1)
    ranks = (below + rng.integers(0, ties + 1)).astype(float)
    ranks[np.isnan(truth)] = np.nan
    return ranks


def rank_bins(n_ranks: int, n_draws: int, min_expected: int = MIN_EXPECTED) -> int:
    """Number of bins of the rank histogram (``bin_ranks``): as many as the L + 1 rank values allow
    with at least ``min_expected`` expected ranks in every bin, the narrowest included (0 when fewer
    than 2 bins are possible)."""
    values = n_draws + 1
    for bins in range(min(values, n_ranks // min_expected), 1, -1):
        if n_ranks * (values // bins) >= min_expected * values:  # the narrowest bin has values // bins ranks
            return bins
    return 0


def bin_ranks(ranks: np.ndarray, n_draws: int, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Counts of ranks in {0, ..., L} over ``n_bins`` contiguous bins of (nearly) equal width, and the
    expected counts under uniformity (proportional to the rank values in each bin)."""
    ranks = np.asarray(ranks, dtype=float)
    ranks = ranks[~np.isnan(ranks)].astype(int)
    which = (np.arange(n_draws + 1) * n_bins) // (n_draws + 1)  # rank value -> bin
    counts = np.bincount(which[ranks], minlength=n_bins).astype(float)
    width = np.bincount(which, minlength=n_bins).astype(float)
    return counts, len(ranks) * width / (n_draws + 1)


def rank_uniformity(ranks: np.ndarray, n_draws: int, min_expected: int = MIN_EXPECTED) -> tuple[float, float, int]:
    """Chi-square test that ``ranks`` (in {0, ..., L}, NaN ignored) are uniform: (statistic, p-value,
    bins), the bins chosen by ``rank_bins``; (NaN, NaN, 0) when there are too few ranks."""
    ranks = np.asarray(ranks, dtype=float)
    ranks = ranks[~np.isnan(ranks)]
    if ranks.size and (ranks.min() < 0 or ranks.max() > n_draws):
        raise InputError(f"rank_uniformity: ranks must lie in [0, {n_draws}]")
    n_bins = rank_bins(len(ranks), n_draws, min_expected)
    if not n_bins:
        return float("nan"), float("nan"), 0
    counts, expected = bin_ranks(ranks, n_draws, n_bins)
    result = sps.chisquare(counts, expected)
    return float(result.statistic), float(result.pvalue), n_bins


# ---------------------------------------------------------------------------------------------- simulation
def reference_tensors(module: MixturePDE, reference: CohortTensors | xr.Dataset) -> CohortTensors:
    """The reference cohort as the module sees it (a contract dataset is gathered on the module's domain)."""
    if isinstance(reference, xr.Dataset):
        if domain_from_dataset(reference).fingerprint() != module.domain.fingerprint():
            raise InputError("the reference cohort's domain differs from the one the model was fitted on")
        reference = cohort_tensors(reference, module.domain)
    return pad_visits(reference, module.n_visits, "reference cohort")


def simulate_cohort(module: MixturePDE, reference: CohortTensors, n_simulations: int, generator: torch.Generator):
    """Subjects from the fitted model: subtype ~ weights, (log D, log r) ~ that subtype's population
    prior, the field solved from a resampled reference subject's first scan over its visit times,
    noise at the model's observation sd on later visits. Returns (CohortTensors, subtype (S,),
    theta (S, 2) with NaN log r for rate-free subtypes, reference index (S,))."""
    dtype = torch.float64
    weights, noise = global_means(module)
    sd = float(observation_sd(noise))
    subtype = torch.multinomial(weights.double(), n_simulations, replacement=True, generator=generator)
    source = torch.randint(0, reference.n_subjects, (n_simulations,), generator=generator)
    if module.population_terms == 1:
        loc, scale = module.population_loc.to(dtype), module.population_scale.to(dtype)
        theta = loc[subtype] + scale[subtype] * torch.randn(n_simulations, 2, generator=generator, dtype=dtype)
    else:  # a draw of every component's population, kept for the subject's subtype
        log_d, log_r = module.draw_population(n_simulations, dtype, generator=generator)
        rows = torch.arange(n_simulations)
        rate_col = torch.tensor([module.rate_index.index(k) if k in module.rate_index else 0
                                 for k in range(module.n_components)])
        theta = torch.stack([log_d[rows, subtype], log_r[rows, rate_col[subtype]] if log_r is not None
                             else torch.zeros(n_simulations, dtype=dtype)], -1)
    has_rate = module.rate_mask()
    theta[~has_rate[subtype], 1] = torch.nan
    u0 = reference.signal[source, 0].to(dtype)
    times, observed = reference.times[source].to(dtype), reference.observed[source]
    fields = torch.zeros(n_simulations, times.shape[1], u0.shape[1], dtype=dtype)
    with torch.no_grad():
        for k in subtype.unique().tolist():  # one batched solve per subtype
            rows = (subtype == k).nonzero()[:, 0]
            d = torch.exp(theta[rows, 0:1])
            r = torch.exp(theta[rows, 1:2]) if module.terms[k].has_rate else torch.zeros_like(d)
            fields[rows] = solve_active(module.domain, u0[rows], times[rows], d, r, [module.terms[k]],
                                        module.solver_settings())[:, 0]
    fields[:, 1:] += sd * torch.randn(fields[:, 1:].shape, generator=generator, dtype=dtype)
    fields = fields * observed[..., None]
    subjects = [f"sim-{i:05d}" for i in range(n_simulations)]
    data = CohortTensors(subjects, fields.to(reference.signal.dtype), times.to(reference.times.dtype), observed)
    return data, subtype, theta, source


# ---------------------------------------------------------------------------------------------- posterior draws
def amortized_draws(module: MixturePDE, data: CohortTensors, subtype: torch.Tensor, n_draws: int, seed: int):
    """``n_draws`` draws (S, L, 2) of (log D, log r) from the amortized guide q under each subject's
    subtype ``subtype`` (S,) (one encoder pass, no solve) and log p(subtype | x) (S,) of that
    subtype by the subtype head; log r draws are NaN for rate-free subtypes."""
    generator = torch.Generator().manual_seed(seed)
    log_probs, guide = encode_amortized_cohort(module, data)
    rows = torch.arange(data.n_subjects)
    loc = torch.stack([guide.d_loc, guide.r_loc], -1).double().cpu()[rows, subtype]  # (S, 2)
    scale = torch.stack([guide.d_scale, guide.r_scale], -1).double().cpu()[rows, subtype]
    eps = torch.randn(data.n_subjects, n_draws, 2, generator=generator, dtype=torch.float64)
    # q's shape beyond a Gaussian (the identity for a LogNormal q), under each subject's subtype
    deviates = torch.stack([module.shape(eps[..., j, None].expand(-1, -1, module.n_components), j)[
        rows, :, subtype] for j in (0, 1)], -1)
    return loc[:, None] + scale[:, None] * deviates, log_probs.cpu()[rows, subtype]


def posterior_draws(module: MixturePDE, data: CohortTensors, subtype: torch.Tensor, n_draws: int,
                    n_particles: int, seed: int, n_iter: int = 3):
    """``n_draws`` draws (S, L, 2) of (log D, log r) from each subject's posterior under its subtype
    ``subtype`` (S,), computed as ``posterior_dataset`` computes it: the Laplace approximation
    (``n_particles`` = 0: Gaussian draws from it) or, with ``n_particles`` > 0, importance sampling
    from it (draws resampled from the weighted particles); also log p(subtype | x) (S,) of the
    true subtype. log r draws are NaN for rate-free subtypes."""
    weights, noise = (t.cpu() for t in global_means(module))
    generator = torch.Generator().manual_seed(seed)
    refined = refined_fit(module, data, noise, n_particles, seed=seed, n_iter=n_iter)
    fit, log_evidence, stats, log_w = refined.fit, refined.log_evidence, refined.stats, refined.log_w
    rows = torch.arange(data.n_subjects)
    if n_particles:
        w = torch.softmax(log_w[:, rows, subtype].T.double(), dim=-1)  # (S, P)
        pick = torch.multinomial(w, n_draws, replacement=True, generator=generator)  # (S, L)
        d = stats.diffusivity.cpu().double()[:, rows, subtype].T
        r = stats.reaction.cpu().double()[:, rows, subtype].T
        draws = torch.stack([torch.log(torch.gather(d, 1, pick)), torch.log(torch.gather(r, 1, pick))], -1)
    else:
        mean = fit.mean.cpu().double()[rows, subtype]  # (S, 2)
        cov = fit.cov.cpu().double()[rows, subtype]  # (S, 2, 2)
        chol = torch.linalg.cholesky(cov)
        z = torch.randn(data.n_subjects, n_draws, 2, generator=generator, dtype=torch.float64)
        draws = mean[:, None] + torch.einsum("sij,slj->sli", chol, z)
    has_rate = fit.has_rate.cpu()[subtype]
    draws[~has_rate, :, 1] = torch.nan
    log_prob = subtype_log_probs(log_evidence, weights)[rows, subtype]
    return draws, log_prob


# ---------------------------------------------------------------------------------------------- SBC
def simulation_based_calibration(model, reference: CohortTensors | xr.Dataset, n_simulations: int = 200,
                                 n_draws: int = 20, seed: int = 0, n_particles: int | None = None,
                                 n_iter: int = 3, posterior: str = "refined") -> xr.Dataset:
    """Simulation-based calibration of a fitted mixture's per-subject posteriors of (log D, log r).

    model: the fitted ``MixturePDE`` (or anything with one as ``module_``, e.g. a ``SubtypeModel``).
    reference: the cohort whose subjects lend the simulations their first scan and visit times
    (resampled with replacement): ``CohortTensors`` on the model's domain or a contract dataset.
    n_simulations subjects are simulated and fitted as one cohort; each gets ``n_draws`` posterior
    draws under its true subtype. ``n_particles``: importance draws per subject and subtype, as in
    ``posterior_dataset`` (default: ``SMALL_DOMAIN_PARTICLES`` on domains of at most
    ``SMALL_DOMAIN_NODES`` nodes, else 0: Gaussian draws from the Laplace approximation).
    ``posterior="amortized"``: draws from the encoder's guide q alone (``amortized_draws``; a model
    trained by ``inference.amortize``), the posterior ``predict`` keeps for trusted subjects.

    Returns a Dataset with ``rank`` (simulation, parameter) in {0, ..., n_draws} (NaN: log r of a
    rate-free subtype), ``true_subtype``, ``true_value`` (simulation, parameter), ``reference_subject``,
    ``true_subtype_prob`` (posterior probability of the true subtype), and per (subtype, parameter)
    the chi-square uniformity test of the ranks: ``chi2_statistic``, ``p_value``, ``n_bins``, ``count``
    (NaN where there are fewer than 2 * ``MIN_EXPECTED`` ranks or the subtype has no rate).
    """
    module = getattr(model, "module_", model)
    if not isinstance(module, MixturePDE):
        raise InputError("simulation_based_calibration needs a fitted model (MixturePDE or a fitted SubtypeModel)")
    if n_simulations < 1 or n_draws < 1:
        raise InputError(f"n_simulations and n_draws must be >= 1, got {n_simulations} and {n_draws}")
    if posterior not in ("refined", "amortized"):
        raise InputError(f"posterior must be 'refined' or 'amortized', got {posterior!r}")
    if posterior == "amortized" and not bool(module.amortized):
        raise InputError("posterior='amortized' needs a model whose encoder was amortized after the fit; refit it "
                         "with amortize steps (pyrovae-pde fit --amortize-steps N, N > 0)")
    if n_particles is None:
        n_particles = SMALL_DOMAIN_PARTICLES if module.domain.n_nodes <= SMALL_DOMAIN_NODES else 0
    if n_particles < 0:
        raise InputError(f"n_particles must be >= 0, got {n_particles}")
    reference = reference_tensors(module, reference)
    if reference.n_subjects < 1:
        raise InputError("the reference cohort has no subject")
    generator = torch.Generator().manual_seed(seed)
    device = next(module.parameters()).device
    module.to("cpu")
    try:
        data, subtype, theta, source = simulate_cohort(module, reference, n_simulations, generator)
        if posterior == "amortized":
            draws, log_prob = amortized_draws(module, data, subtype, n_draws, seed + 1)
        else:
            draws, log_prob = posterior_draws(module, data, subtype, n_draws, n_particles, seed + 1, n_iter)
    finally:
        module.to(device)
    rng = np.random.default_rng(seed)
    truth = theta.numpy()
    draws = draws.numpy()
    ranks = np.stack([ranks_of(truth[:, j], draws[:, :, j], rng) for j in range(2)], axis=1)
    components = list(module.components)
    subtype = subtype.numpy()
    test = np.full((len(components), 2, 4), np.nan)
    for k in range(len(components)):
        for j in range(2):
            chosen = ranks[subtype == k, j]
            chosen = chosen[~np.isnan(chosen)]
            statistic, p_value, n_bins = rank_uniformity(chosen, n_draws)
            test[k, j] = statistic, p_value, n_bins, len(chosen)
    sim_dims, test_dims = ("simulation", "parameter"), ("subtype", "parameter")
    ds = xr.Dataset(
        {"rank": (sim_dims, ranks), "true_value": (sim_dims, truth),
         "true_subtype": (("simulation",), np.array([components[k] for k in subtype], dtype=object)),
         "reference_subject": (("simulation",), np.array([reference.subjects[i] for i in source.tolist()],
                                                         dtype=object)),
         "true_subtype_prob": (("simulation",), log_prob.exp().numpy().astype(float)),
         "chi2_statistic": (test_dims, test[..., 0]), "p_value": (test_dims, test[..., 1]),
         "n_bins": (test_dims, test[..., 2]), "count": (test_dims, test[..., 3])},
        coords={"simulation": np.arange(n_simulations), "parameter": list(PARAMETERS),
                "subtype": np.array(components, dtype=object)},
        attrs={"kind": "sbc", "n_draws": int(n_draws), "n_simulations": int(n_simulations), "seed": int(seed),
               "n_particles": int(n_particles),
               "posterior": ("amortized guide" if posterior == "amortized" else
                             "importance-sampled Laplace" if n_particles else "Laplace"),
               "noise_sd": float(observation_sd(global_means(module)[1]))})
    ds["rank"].attrs["description"] = "number of posterior draws below the true value (uniform if calibrated)"
    ds["true_subtype_prob"].attrs["description"] = "posterior probability of the simulated subject's true subtype"
    ds["p_value"].attrs["description"] = "chi-square test of uniform ranks per subtype and parameter"
    return ds


def format_pvalues(sbc: xr.Dataset) -> list[str]:
    """One line per (subtype, parameter) with a test: ranks counted, bins, chi-square and p-value."""
    lines = []
    for k in sbc["subtype"].values:
        for par in sbc["parameter"].values:
            row = sbc.sel(subtype=k, parameter=par)
            if int(row["count"]) == 0:
                continue
            p = float(row["p_value"])
            text = (f"p = {p:.3g} (chi2 {float(row['chi2_statistic']):.1f}, {int(row['n_bins'])} bins)"
                    if np.isfinite(p) else "too few ranks for the test")
            lines.append(f"{k} {par}: {int(row['count'])} ranks, {text}")
    return lines
