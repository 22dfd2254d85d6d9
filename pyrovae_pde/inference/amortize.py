"""Amortized inference after the fit: the encoder learns the fitted model's posteriors from
subjects simulated by that model (neural posterior estimation).

Each step draws a batch of the cohort's own subjects for their first scans, visit times and missing
visits, draws (D, r) of every component from the fitted population priors, solves every component's
PDE and adds noise at the fitted noise scale. Every synthetic subject x_k simulated by component k
then trains

* the LogNormal head q_k(D, r | x) by -log q_k(theta_k | x_k): its minimiser over a rich enough
  family is the component-conditional posterior p(theta | x, subtype = k), averaged over the
  fitted model's prior predictive;
* the subtype head by cross-entropy against k, with every component equally often: its softmax is
  p(subtype = k | x) under equal weights, so adding log w gives the posterior under weights w.

The simulations follow the fitted model, so the amortized posteriors are calibrated on average
over it (simulation-based calibration checks exactly this, ``inference.sbc``); for subjects unlike
the simulations they can be wrong, which ``posterior`` detects and refines.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.cohort import CohortTensors
from ..model.likelihood import observation_sd
from ..model.module import SHAPE_SCORES, MixturePDE
from .encoding import global_means
from .laplace import posterior_hessian

DEFAULT_STEPS = 4000
BANK_BYTES = 512 * 2 ** 20  # noise-free simulations kept for reuse
BANK_REUSE = 4  # each simulated draw is used this many times on average (with fresh noise)
MIN_BANK = 1024


@dataclass
class AmortizationReport:
    """What the amortization stage did: ``steps`` taken, the loss per step (``nll``: -log q of the
    truth, nats per component; ``cross_entropy``: of the subtype head, nats), and on a held-out
    simulated set of ``n_validation`` subjects per component: the subtype head's accuracy and mean
    top probability (its calibration gap is their difference), and the 90% interval coverage of
    log D and log r by q under the simulating component."""

    steps: int
    seconds: float
    bank: int = 0
    nll: list[float] = field(default_factory=list)
    cross_entropy: list[float] = field(default_factory=list)
    validation: dict = field(default_factory=dict)

    def summary(self) -> str:
        """One line for the log: steps, time, and the held-out simulated checks."""
        v = self.validation
        parts = [f"{self.steps} steps in {self.seconds:.0f} s"]
        if "simulated_accuracy" in v:
            parts.append(f"on new simulated subjects: subtype accuracy {v['simulated_accuracy']:.3f} "
                         f"(mean top probability {v['simulated_top_probability']:.3f})")
            coverage = [f"{v[key]:.2f}" for key in ("simulated_coverage_d", "simulated_coverage_r") if key in v]
            parts.append("90% coverage of D" + (" / r " if len(coverage) > 1 else " ") + " / ".join(coverage))
        if "calibration_temperature" in v:
            parts.append(f"subtype temperature {v['calibration_temperature']:.2f}")
        return "; ".join(parts)

    def as_dict(self) -> dict:
        tail = max(1, len(self.nll) // 10)
        return {"steps": self.steps, "seconds": round(self.seconds, 1), "simulation_bank": self.bank,
                "final_nll": float(sum(self.nll[-tail:]) / tail) if self.nll else math.nan,
                "final_cross_entropy": (float(sum(self.cross_entropy[-tail:]) / tail) if self.cross_entropy
                                        else math.nan),
                **self.validation}


def simulate_clean(module: MixturePDE, data: CohortTensors, batch: int, generator: torch.Generator):
    """Noise-free synthetic subjects like the cohort's: the first scans, visit times and missing
    visits of ``batch`` subjects drawn from ``data``, (D, r) of every component drawn from the
    fitted population priors, every component's PDE solved with the model's own solver.

    Returns fields (B, K, T, n), times (B, T), observed (B, T), diffusivity (B, K), reaction (B, K_r) or None.
    """
    pick = torch.randint(data.n_subjects, (batch,), generator=generator)
    u0 = data.signal[pick, 0]
    times, observed = data.times[pick], data.observed[pick]
    with torch.no_grad():
        log_d, log_r = module.draw_population(batch, u0.dtype, None, generator)
        log_d, log_r = log_d.to(u0.device), None if log_r is None else log_r.to(u0.device)
        diffusivity, reaction = torch.exp(log_d), None if log_r is None else torch.exp(log_r)
        # the model's own solver, as its likelihood solves (module.predict: step counts shared across a
        # subject's components): the sleep phase's coarse solves are biased by 0.003 on the paper grid,
        # enough to shift the amortized posterior of r off the real subjects'
        fields = module.predict(u0, times, diffusivity, reaction)  # (B, K, T, n)
    return fields, times, observed, diffusivity, reaction


def add_noise(fields: torch.Tensor, observed: torch.Tensor, noise_sd: float,
              generator: torch.Generator) -> torch.Tensor:
    """fields (B, K, T, n) plus Gaussian noise of sd ``noise_sd`` on the later visits, zero at missing visits."""
    noise = torch.randn(fields[:, :, 1:].shape, generator=generator, dtype=fields.dtype).to(fields.device)
    out = fields.clone()
    out[:, :, 1:] += noise_sd * noise
    return out * observed[:, None, :, None]


def simulate_like(module: MixturePDE, data: CohortTensors, batch: int, noise_sd: float,
                  generator: torch.Generator):
    """``simulate_clean`` with noise of sd ``noise_sd`` (``add_noise``): fields (B, K, T, n), times,
    observed, diffusivity, reaction."""
    fields, times, observed, diffusivity, reaction = simulate_clean(module, data, batch, generator)
    return add_noise(fields, observed, noise_sd, generator), times, observed, diffusivity, reaction


class _SimulationBank:
    """Noise-free synthetic subjects solved once and drawn with fresh noise at every step: the
    solves cost more than the encoder's step, and (D, r) of a few thousand draws per component
    already cover the population (the noise, redrawn each time, is what varies most)."""

    def __init__(self, module: MixturePDE, data: CohortTensors, size: int, generator: torch.Generator,
                 chunk: int = 256):
        parts = [simulate_clean(module, data, min(chunk, size - start), generator) for start in range(0, size, chunk)]
        self.fields, self.times, self.observed, self.diffusivity = (torch.cat([p[i] for p in parts]) for i in range(4))
        self.reaction = None if parts[0][4] is None else torch.cat([p[4] for p in parts])
        self.size = size

    def draw(self, batch: int, noise_sd: float, generator: torch.Generator):
        pick = torch.randint(self.size, (batch,), generator=generator)
        observed = self.observed[pick]
        return (add_noise(self.fields[pick], observed, noise_sd, generator), self.times[pick], observed,
                self.diffusivity[pick], None if self.reaction is None else self.reaction[pick])


def bank_size(module: MixturePDE, data: CohortTensors, steps: int, batch_size: int,
              max_bytes: float = BANK_BYTES) -> int:
    """Draws kept in the simulation bank: every step's draws while they fit in ``max_bytes``,
    else as many as fit (0: too few to be worth keeping; each step then simulates its own)."""
    per_draw = module.n_components * data.signal.shape[1] * data.signal.shape[2] * data.signal.element_size()
    size = min(steps * batch_size // BANK_REUSE, int(max_bytes // per_draw))
    return size if size >= MIN_BANK else 0


def amortize(module: MixturePDE, data: CohortTensors, steps: int = DEFAULT_STEPS, batch_size: int = 32,
             lr: float = 2e-3, seed: int = 0, n_validation: int = 256, n_calibration: int = 1024,
             progress: bool = False) -> AmortizationReport:
    """Train the encoder (body, LogNormal head, subtype head) on subjects simulated by the fitted
    ``module`` like ``data``'s (see the module docstring); sets ``module.amortized``.

    ``steps`` Adam steps of ``batch_size`` draws (each simulated by every component), learning
    rate ``lr`` decayed to a tenth by a cosine schedule. Draws come from a bank of noise-free
    simulations (``bank_size``) with fresh noise at every step. Then ``calibrate`` on
    ``n_calibration`` new simulations, and the report's checks on ``n_validation`` others. The
    populations, weights and noise of the model are not changed; the noise of the simulations is
    the model's.
    """
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    _, noise = global_means(module)
    noise_sd = float(observation_sd(noise))
    validation = simulate_like(module, data, n_validation, noise_sd, torch.Generator().manual_seed(seed + 1))
    size = bank_size(module, data, steps, batch_size)
    bank = _SimulationBank(module, data, size, generator) if size else None
    params = list(module.encoder.parameters()) + list(module.subtype_head.parameters())
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1), eta_min=lr / 10)
    report = AmortizationReport(steps=0, seconds=0.0, bank=size)
    bar = tqdm(range(steps), desc="amortized posterior (simulated subjects)", unit="step", disable=not progress,
               leave=False)
    was_training = module.training
    module.train()
    for _ in bar:
        batch = (bank.draw(batch_size, noise_sd, generator) if bank is not None
                 else simulate_like(module, data, batch_size, noise_sd, generator))
        nll, cross_entropy = module.amortized_loss(*batch)
        loss = nll + cross_entropy
        optimizer.zero_grad()
        if torch.isfinite(loss):
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            optimizer.step()
        schedule.step()
        report.nll.append(float(nll.detach()))
        report.cross_entropy.append(float(cross_entropy.detach()))
        report.steps += 1
        if progress and report.steps % 50 == 0:
            bar.set_postfix(nll=f"{report.nll[-1]:.3f}", ce=f"{report.cross_entropy[-1]:.3f}")
    bar.close()
    module.train(was_training)
    with torch.no_grad():
        module.amortized.fill_(True)
    calibration = calibrate(module, data, n_calibration, noise_sd, torch.Generator().manual_seed(seed + 2))
    report.validation = {**calibration, **simulated_check(module, *validation)}
    report.seconds = time.perf_counter() - start
    return report


def _own_posteriors(module: MixturePDE, fields: torch.Tensor, times: torch.Tensor, observed: torch.Tensor,
                    diffusivity: torch.Tensor, reaction: torch.Tensor | None, calibrated: bool = True):
    """The amortized posterior of synthetic subjects simulated by every component (``simulate_like``):
    subtype logits (B * K, K), the simulating component of each row (B * K,), and under that
    component's q the truth theta, q's loc and scale, (B * K, 2) each for (log D, log r) (NaN in
    the log r column of rate-free components), all on the CPU in float64."""
    with torch.no_grad():
        logits, d_loc, d_scale, r_loc, r_scale = module.encode_amortized(
            *module.flatten_simulated(fields, times, observed), calibrated=calibrated)
    batch, k = diffusivity.shape
    own = torch.arange(k).repeat(batch)
    rows = torch.arange(batch * k)
    theta, loc, scale = (torch.full((batch * k, 2), torch.nan, dtype=torch.float64) for _ in range(3))
    theta[:, 0] = diffusivity.log().reshape(-1).cpu().double()
    loc[:, 0], scale[:, 0] = d_loc[rows, own].cpu().double(), d_scale[rows, own].cpu().double()
    for j, c in enumerate(module.rate_index):
        pick = own == c
        theta[pick, 1] = reaction[:, j].log().cpu().double()
        loc[pick, 1], scale[pick, 1] = r_loc[pick, j].cpu().double(), r_scale[pick, j].cpu().double()
    return logits.cpu(), own, theta, loc, scale


def _standardized_errors(module: MixturePDE, fields: torch.Tensor, times: torch.Tensor, observed: torch.Tensor,
                         diffusivity: torch.Tensor, reaction: torch.Tensor | None):
    """As ``_own_posteriors``, with the truth's z = (theta - loc) / scale under the simulating
    component's (calibrated) q in place of theta, loc and scale: (logits, own, z_d, z_r)."""
    logits, own, theta, loc, scale = _own_posteriors(module, fields, times, observed, diffusivity, reaction)
    z = (theta - loc) / scale
    return logits, own, z[:, 0], z[:, 1]


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature T > 0 minimising the cross-entropy of softmax(logits / T) against ``labels``
    (temperature scaling, Guo et al. 2017): logits (B, K), labels (B,). The cross-entropy is convex
    in 1 / T, so a bounded scalar search finds its minimum (T in [0.02, 50])."""
    from scipy.optimize import minimize_scalar

    logits, labels = logits.double().cpu(), labels.cpu()

    def cross_entropy(inverse: float) -> float:
        return float(torch.nn.functional.cross_entropy(logits * inverse, labels))

    best = minimize_scalar(cross_entropy, bounds=(0.02, 50.0), method="bounded", options={"xatol": 1e-4})
    return 1.0 / float(best.x)


@dataclass
class ConditionalCalibration:
    """z = (theta - loc) / scale of q modelled as Normal(shift . c, exp(log_stretch . c)^2) with
    covariates c = (1, (loc - center[0]) / spread[0], (log scale - center[1]) / spread[1]), the
    last two clamped to +-3: ``shift``, ``log_stretch`` (3,), ``center``, ``spread`` (2,)."""

    shift: torch.Tensor
    log_stretch: torch.Tensor
    center: torch.Tensor
    spread: torch.Tensor


def fit_conditional_calibration(z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> ConditionalCalibration:
    """Maximum-likelihood ``ConditionalCalibration`` of standardized errors ``z`` (n,) of a
    posterior approximation with centres ``loc`` and scales ``scale`` (n,) on simulations from
    the model (a heteroscedastic linear regression of z on the covariates; its negative log
    likelihood is convex in (shift, log_stretch)). With no dependence on the covariates it
    reduces to the mean and the (population) sd of z."""
    from scipy.optimize import minimize

    z, loc, scale = (t.double().cpu() for t in (z, loc, scale))
    keep = torch.isfinite(z) & torch.isfinite(loc) & (scale > 0)
    z, loc, log_scale = z[keep], loc[keep], torch.log(scale[keep])
    raw = torch.stack([loc, log_scale], -1)
    center, spread = raw.mean(0), raw.std(0).clamp_min(1e-6)
    covariates = torch.cat([torch.ones(len(z), 1, dtype=torch.float64), ((raw - center) / spread).clamp(-3, 3)], -1)
    shift = torch.zeros(3, dtype=torch.float64)
    log_stretch = torch.zeros(3, dtype=torch.float64)
    shift[0], log_stretch[0] = z.mean(), torch.log(z.std(unbiased=False).clamp_min(1e-6))
    x, y = covariates.numpy(), z.numpy()

    def negative_log_likelihood(params: np.ndarray):
        mean, log_sd = x @ params[:3], x @ params[3:]
        scaled = (y - mean) * np.exp(-log_sd)
        loss = np.mean(log_sd + 0.5 * scaled ** 2)
        grad = np.concatenate([-(x * (scaled * np.exp(-log_sd))[:, None]).mean(0),
                               (x * (1.0 - scaled ** 2)[:, None]).mean(0)])
        return loss, grad

    best = minimize(negative_log_likelihood, torch.cat([shift, log_stretch]).numpy(), jac=True, method="L-BFGS-B",
                    options={"gtol": 1e-10, "ftol": 1e-14, "maxiter": 500})
    params = torch.from_numpy(best.x)
    return ConditionalCalibration(params[:3], params[3:], center, spread)


def calibrate(module: MixturePDE, data: CohortTensors, n: int, noise_sd: float, generator: torch.Generator) -> dict:
    """Recalibration of the amortized posterior on ``n`` new simulations per component.

    q: per (component, coordinate), ``fit_conditional_calibration`` of the truth's z under the
    simulating component's q, written to ``module.amortized_shift``, ``amortized_log_stretch``,
    ``amortized_center`` and ``amortized_spread``: on average over the model's prior predictive,
    and along q's own centre and width, q is then centred and as wide as its errors. (Measured:
    on the paper grid at noise 0.05 the trained q sat 0.2-0.4 of its sd below the truth; noise-free
    its errors ran against its centre, correlation -0.4 to -0.7, which a constant shift cannot
    remove and SBC rejected.)
    Subtype head: ``amortized_temperature`` by ``fit_temperature`` against the simulating
    components (noise-free the head came out under-confident: top probability 0.947 at accuracy
    0.987). Returns the fitted values."""
    module.reset_calibration()
    if n < 2:
        return {}
    logits, own, theta, loc, scale = _own_posteriors(module, *simulate_like(module, data, n, noise_sd, generator),
                                                     calibrated=False)
    fitted = {}
    coordinates = [(c, 0) for c in range(module.n_components)] + [(c, 1) for c in module.rate_index]
    for c, j in coordinates:
        pick = own == c
        fit = fit_conditional_calibration((theta[pick, j] - loc[pick, j]) / scale[pick, j], loc[pick, j],
                                          scale[pick, j])
        fitted[(c, j)] = fit
        with torch.no_grad():
            for name, value in (("amortized_shift", fit.shift), ("amortized_log_stretch", fit.log_stretch),
                                ("amortized_center", fit.center), ("amortized_spread", fit.spread)):
                getattr(module, name)[c, j] = value.to(getattr(module, name))
    # the shape beyond a Gaussian: quantiles of z under the recalibrated centre and width
    levels = torch.distributions.Normal(0.0, 1.0).cdf(SHAPE_SCORES.double())
    for c, j in coordinates:
        pick = own == c
        loc_c, scale_c = module.recalibrate(loc[pick, j][:, None], scale[pick, j][:, None], [c], j)
        z = ((theta[pick, j][:, None] - loc_c) / scale_c)[:, 0]
        with torch.no_grad():
            module.amortized_quantiles[c, j] = torch.quantile(z[torch.isfinite(z)], levels).to(
                module.amortized_quantiles)
    temperature = fit_temperature(logits, own) if module.n_components > 1 else 1.0
    with torch.no_grad():
        module.amortized_temperature.fill_(temperature)
    names = ("log D", "log r")
    return {"calibration_shift": {f"{module.components[c]}/{names[j]}": [round(float(v), 4) for v in f.shift]
                                  for (c, j), f in fitted.items()},
            "calibration_log_stretch": {f"{module.components[c]}/{names[j]}": [round(float(v), 4)
                                                                             for v in f.log_stretch]
                                        for (c, j), f in fitted.items()},
            "calibration_temperature": temperature}


def simulated_check(module: MixturePDE, fields: torch.Tensor, times: torch.Tensor, observed: torch.Tensor,
                    diffusivity: torch.Tensor, reaction: torch.Tensor | None, z90: float = 1.6448536269514722) -> dict:
    """The amortized posterior on synthetic subjects (see ``simulate_like``) under equal weights:
    subtype accuracy, mean top probability, and 90% coverage of log D, log r by the simulating
    component's q (its shape included: the interval between ``module.shape`` of -z90 and z90)."""
    logits, own, z_d, z_r = _standardized_errors(module, fields, times, observed, diffusivity, reaction)
    probs = torch.softmax(logits.double(), dim=-1)
    scores = torch.tensor([[-z90], [z90]], dtype=torch.float64).expand(2, module.n_components)
    out = {"simulated_accuracy": float((probs.argmax(-1) == own).double().mean()),
           "simulated_top_probability": float(probs.max(-1).values.mean())}
    for name, z, coordinate in (("d", z_d, 0), ("r", z_r, 1)):
        if coordinate == 1 and reaction is None:
            continue
        low, high = module.shape(scores, coordinate)[:, own]
        has = torch.isfinite(z)
        out[f"simulated_coverage_{name}"] = float(((z >= low) & (z <= high))[has].double().mean())
    return out


@dataclass
class AmortizedCheck:
    """Per-subject check of the amortized posterior on its most probable component k*: the
    Gauss-Newton ``gain`` (N,) in nats, how much the log posterior of theta under k* would rise
    by one Newton step from q's centre (0 at the mode; large when q sits off the mode),
    ``sd_ratio`` (N,), q's sd of log D over the Laplace approximation's at q's centre (1 when
    q's width is right), and ``fit_p`` (N,), the chi-square upper-tail probability of the
    residuals at the model's noise (sum of squares / sd^2 at q's centre less twice the gain, the
    Newton step's predicted mode, on n_obs degrees of freedom; tiny when the subject's scans are
    noisier than the model or not fitted by it)."""

    component: torch.Tensor
    gain: torch.Tensor
    sd_ratio: torch.Tensor
    fit_p: torch.Tensor | None = None


def check_amortized(module: MixturePDE, data: CohortTensors, component: torch.Tensor, d_loc: torch.Tensor,
                    d_scale: torch.Tensor, r_loc: torch.Tensor, noise_sd: float, dtype: torch.dtype = torch.float32,
                    batch_size: int = 256) -> AmortizedCheck:
    """``AmortizedCheck`` of every subject's q on ``component`` (N,) at observation sd ``noise_sd``:
    three solves of that component per subject (q's centre and a forward difference in log D
    and in log r, the model's own solver at step counts shared by the three) in ``dtype``
    (difference step 1e-2 in float32, 1e-4 in float64).
    d_loc, d_scale (N, K), r_loc (N, K) (NaN or unused where the component has no rate)."""
    from scipy.stats import chi2

    from ..physics import solve_active

    n = data.n_subjects
    step = 1e-2 if dtype == torch.float32 else 1e-4
    gain = torch.zeros(n, dtype=torch.float64)
    sd_ratio = torch.ones(n, dtype=torch.float64)
    fit_p = torch.ones(n, dtype=torch.float64)
    prior = module.prior_terms(torch.float64)  # la, sa, lb, sb (K,): the searches' Gaussian prior
    settings = module.solver_settings()
    variance = noise_sd ** 2
    for k in range(module.n_components):
        rows = torch.nonzero(component == k).flatten()
        has_rate = k in module.rate_index
        term = (module.terms[k],)
        for start in range(0, len(rows), batch_size):
            idx = rows[start:start + batch_size]
            b = len(idx)
            on = idx.to(data.signal.device)  # the solves run where the data is (CPU or CUDA)
            signal = data.signal[on].to(dtype)
            times = data.times[on].to(dtype)
            mask = data.observed[on, 1:].to(dtype)[..., None]
            a0 = d_loc[idx, k].to(signal)
            r0 = r_loc[idx, k].to(signal) if has_rate else signal.new_zeros(b)
            points_a = torch.cat([a0, a0 + step] + ([a0] if has_rate else []))
            points_b = torch.cat([r0, r0] + ([r0 + step] if has_rate else []))
            reps = len(points_a) // b
            rate = torch.exp(points_b) if has_rate else torch.zeros_like(points_b)
            with torch.no_grad():
                fields = solve_active(module.domain, signal[:, 0].repeat(reps, 1), times.repeat(reps, 1),
                                      torch.exp(points_a)[:, None], rate[:, None], term, settings,
                                      step_rates=(torch.exp(r0 + step) if has_rate else rate[:b]).repeat(reps))
            resid = (fields[:, 0, 1:] - signal[:, 1:].repeat(reps, 1, 1)) * mask.repeat(reps, 1, 1)
            resid = resid.reshape(reps, b, -1).double().cpu()
            a0, r0 = a0.double().cpu(), r0.double().cpu()
            ja = (resid[1] - resid[0]) / step  # (B, M)
            jb = (resid[2] - resid[0]) / step if has_rate else torch.zeros_like(ja)
            la, sa, lb, sb = (t[k] for t in prior)
            rate_d = float(has_rate)
            haa, hab, hbb = posterior_hessian((ja * ja).sum(-1), (ja * jb).sum(-1), (jb * jb).sum(-1), variance,
                                              (la, sa, lb, sb), torch.tensor(has_rate))
            grad_a = (ja * resid[0]).sum(-1) / variance + (a0 - la) / sa ** 2
            grad_b = (jb * resid[0]).sum(-1) / variance + rate_d * (r0 - lb) / sb ** 2
            det = haa * hbb - hab ** 2
            # the Newton decrement g^T H^-1 g / 2 of the 2 x 2 (unit placeholder for rate-free) Hessian
            gain[idx] = 0.5 * (hbb * grad_a ** 2 - 2 * hab * grad_a * grad_b + haa * grad_b ** 2) / det
            sd_ratio[idx] = d_scale[idx, k].double() / (hbb / det).sqrt()
            n_obs = mask.double().sum((1, 2)).cpu() * signal.shape[-1]
            # the residuals' chi-square at the Newton step's predicted mode, so that q's offset (the
            # gain) does not count as misfit
            chi_square = ((resid[0] ** 2).sum(-1) / variance - 2.0 * gain[idx]).clamp_min(0.0)
            fit_p[idx] = torch.from_numpy(chi2.sf(chi_square.numpy(), n_obs.clamp_min(1).numpy()))
    return AmortizedCheck(component, gain, sd_ratio, fit_p)


@dataclass
class TrustFlags:
    """Which subjects ``TrustRule.flags`` sends to refinement (``refine`` (N,) bool) and why:
    ``top_probability`` (N,), the ``check`` of the amortized posterior, the ``rule`` applied, and
    ``reasons``: how many subjects each part of the rule flagged (a subject can count under several;
    the check runs only where the probability passes)."""

    refine: torch.Tensor
    top_probability: torch.Tensor
    check: AmortizedCheck
    rule: dict
    reasons: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TrustRule:
    """When ``posterior(refine="auto")`` trusts the amortized guide for a subject: its top subtype
    probability is at least ``min_top_probability`` (below it, the subtype is in doubt and the
    refined evidence decides better than the head), and on that subtype q sits within
    ``max_gain`` nats of the mode (``AmortizedCheck.gain``) with an sd of log D within a factor
    ``max_sd_ratio`` of the Laplace approximation's at q's centre, and its residuals there are
    not significantly larger than the model's noise (chi-square ``fit_p`` at least ``min_fit_p``:
    the encoder was trained at the model's noise, and on a cohort noisier than that it is
    confidently wrong while its centre sits near the mode). Every other subject is refined."""

    min_top_probability: float = 0.9
    max_gain: float = 5.0
    max_sd_ratio: float = 2.0
    min_fit_p: float = 1e-4

    def flags(self, module: MixturePDE, data: CohortTensors, log_probs: torch.Tensor, guide,
              noise_sd: float) -> TrustFlags:
        """``TrustFlags`` of a cohort from its amortized ``log_probs`` (N, K) and ``guide``
        (``GuideSummary``); the check solves only the subjects the probability rule keeps."""
        top, component = log_probs.exp().max(dim=-1)
        doubtful = (top < self.min_top_probability).cpu()
        keep = torch.nonzero(~doubtful).flatten()
        check = AmortizedCheck(component.cpu(), torch.zeros(len(top), dtype=torch.float64),
                               torch.ones(len(top), dtype=torch.float64), torch.ones(len(top), dtype=torch.float64))
        if len(keep):
            part = check_amortized(module, data.subset(keep), component[keep].cpu(), guide.d_loc[keep].cpu(),
                                   guide.d_scale[keep].cpu(), guide.r_loc[keep].cpu(), noise_sd)
            check.gain[keep], check.sd_ratio[keep], check.fit_p[keep] = part.gain, part.sd_ratio, part.fit_p
        parts = {"top_probability": doubtful,
                 "newton_gain": (check.gain > self.max_gain) | ~torch.isfinite(check.gain),
                 "sd_ratio": (check.sd_ratio > self.max_sd_ratio) | (check.sd_ratio < 1.0 / self.max_sd_ratio),
                 "residuals": check.fit_p < self.min_fit_p}
        refine = torch.stack(list(parts.values())).any(0)
        return TrustFlags(refine, top.cpu(), check, dataclasses.asdict(self),
                          {name: int(flag.sum()) for name, flag in parts.items()})
