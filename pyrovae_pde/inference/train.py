"""Training: semi-amortized SVI on the TraceEnum_ELBO, built to converge on any cohort.

Why not plain amortized SVI: each subject's posterior over (log D, log r) is far narrower than
anything an encoder predicts early on (hundreds of observed values at noise sd 0.02-0.05 pin
log D to a few hundredths), so single-draw reparameterised ELBO gradients through the PDE are
mostly noise; in the wake phase they drove the encoder's scales to their bound and the noise
scale up, and the fit collapsed or wandered (issue "training that converges"). Here each part
has a well-posed objective:

1. **Warm-up** (``warmup_sleep_steps``): the encoder learns, on subjects simulated from every
   component's prior (with the cohort's own first scans and visit times), to guess parameters.
2. **Least-squares pass**: every training and validation subject's mode under every component
   is found by a global search over the prior's support (``search.search_modes``: a coarse
   grid, the encoder's guess as one more candidate, then Levenberg-Marquardt). The noise scale
   starts at the pooled residual sd at the modes; the population priors and the mixture weights
   at their EM estimates from the Laplace evidences (``population.em_population``); the encoder
   is distilled towards the Laplace posteriors.
3. **Epochs.** For each minibatch, each subject's q_k(D, r) is the Laplace approximation at its
   mode, re-found by a few Levenberg-Marquardt steps from the last epoch's mode at the current
   noise and priors (``laplace.laplace_fit``, two-level); the TraceEnum_ELBO (subtype
   enumerated) with that guide updates the noise scale; the encoder is trained to predict those
   posteriors (``MixturePDE.distillation_loss``) and, every ``sleep_every`` steps, on simulated
   subjects. After the epoch, the population priors and q(weights) = Dirichlet(c + sum_i
   p(subtype_i | x_i)) take an EM step from the epoch's Laplace approximations (inside the ELBO,
   with component-conditional q_k, the enumerated responsibilities would compare likelihoods at
   draws instead of evidences and favour the more flexible mechanisms).
4. **Control.** A step whose loss or gradient is not finite is skipped and counted. After every
   epoch the validation ELBO is computed with common random numbers; when it is not finite or
   falls by more than ``rollback_drop`` nats per subject (plus 3 MC SE) below its best, or more
   than a quarter of the epoch's steps were skipped, the run rolls back to its best state and
   halves its learning rates; after ``max_rollbacks`` roll-backs it stops with
   ``TrainingDivergedError`` (the last good checkpoint stays on disk). The run stops when the
   validation ELBO has not improved by ``plateau_tolerance`` nats per subject (or twice its MC
   SE) over ``plateau_window`` epochs (converged), or at ``epochs`` (not converged).
5. **Restarts** (``restarts``): the whole fit from other seeds (same train/validation split);
   the best validation ELBO wins, and the spread of the restarts' ELBOs is recorded.

``guide="amortized"`` trains the encoder by the wake-phase ELBO instead (the pre-0.2 scheme),
kept to measure against.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyro
import torch
from pyro.infer import TraceEnum_ELBO
from tqdm.auto import tqdm

from ..data.cohort import CohortTensors
from ..errors import InputError, MissingFileError, TrainingDivergedError
from ..model.module import MAX_PLATE_NESTING, NOISE_FLOOR, MixturePDE, RefinedPosterior
from .encoding import GuideSummary, encode_cohort
from .laplace import LaplaceFit, laplace_evidence, laplace_fit, pooled_residual_variance
from .population import Population, em_population
from .prior_check import prior_conflict
from .search import search_modes

CHECKPOINT_NAME = "checkpoint.pt"
GUIDES = ("semi-amortized", "amortized")


@dataclass
class TrainConfig:
    """Settings of a fit (see the module docstring for the schedule)."""

    epochs: int = 40  # the most epochs; a run that reaches its plateau stops earlier
    batch_size: int = 64
    learning_rate: float = 0.01  # Adam on the globals (and on the encoder's wake step if amortized)
    encoder_learning_rate: float = 3e-3
    validation_fraction: float = 0.1
    seed: int = 0
    split_seed: int | None = None  # seed of the train/validation split (default: seed); restarts share it
    device: str = "cpu"
    clip_norm: float = 20.0
    guide: str = "semi-amortized"
    warmup_sleep_steps: int = 200
    sleep_batch_size: int = 32
    sleep_every: int = 4
    search_grid: int = 5
    refine_iterations: int = 2
    distill_steps: int = 200
    learn_population: bool = True  # empirical-Bayes population priors (population.py); False: the base priors
    validation_draws: int = 4
    min_epochs: int = 3
    plateau_window: int = 3
    plateau_tolerance: float = 0.02  # nats per subject
    rollback_drop: float = 5.0  # nats per subject below the best validation ELBO (plus 3 MC SE)
    max_rollbacks: int = 4
    restarts: int = 1
    progress: bool = True

    def __post_init__(self):
        if self.guide not in GUIDES:
            raise InputError(f"guide must be one of {GUIDES}, got {self.guide!r}")
        for name in ("epochs", "batch_size", "restarts", "plateau_window"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.learning_rate > 0 or not self.encoder_learning_rate > 0:
            raise InputError("learning rates must be > 0")


@dataclass
class TrainState:
    """What a run records: its history and its convergence diagnostics (saved in model.json).

    ``history``: one record per epoch (train and validation ELBO per subject, learning-rate
    scale). ``converged``: the validation ELBO reached a plateau before ``epochs``;
    ``stop_reason``; ``elbo_slope``: slope of the smoothed validation ELBO over the last
    ``plateau_window`` epochs (nats per subject and epoch); ``rollbacks`` and ``skipped_steps``;
    ``restart_elbos``: the final validation ELBO of every restart (their spread is in
    ``restart_spread``); ``restart``: which restart this state belongs to.
    """

    epoch: int = 0
    history: list = field(default_factory=list)
    best_val: float = math.inf  # best validation loss (negative ELBO per subject)
    best_epoch: int = -1
    stopped_early: bool = False
    converged: bool = False
    stop_reason: str = "not started"
    elbo_slope: float = math.nan
    rollbacks: int = 0
    skipped_steps: int = 0
    lr_scale: float = 1.0
    restart: int = 0
    restart_elbos: list = field(default_factory=list)
    initial_noise: float = math.nan
    initial_weights: list = field(default_factory=list)
    prior_check: list = field(default_factory=list)  # prior_check.PriorCheck.as_dict() per parameter

    @property
    def restart_spread(self) -> float:
        vals = [v for v in self.restart_elbos if math.isfinite(v)]
        return float(max(vals) - min(vals)) if len(vals) > 1 else math.nan

    def diagnostics(self) -> dict:
        """The convergence record written to model.json."""
        return {"converged": self.converged, "stop_reason": self.stop_reason, "epochs_run": self.epoch,
                "best_epoch": self.best_epoch, "best_validation_elbo": -self.best_val,
                "elbo_slope_per_epoch": self.elbo_slope, "rollbacks": self.rollbacks,
                "skipped_steps": self.skipped_steps, "restarts": max(1, len(self.restart_elbos)),
                "restart_elbos": self.restart_elbos, "restart_spread": self.restart_spread,
                "prior_check": self.prior_check}


def split_indices(n: int, validation_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Reproducible train/validation split of n subjects (no validation set below 10 subjects)."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * validation_fraction)) if n >= 10 else 0
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _elbo() -> TraceEnum_ELBO:
    return TraceEnum_ELBO(max_plate_nesting=MAX_PLATE_NESTING)


def noise_sd(module: MixturePDE) -> float:
    """The model's observation sd at the guide's median noise scale (noise floor included)."""
    return float(torch.sqrt(torch.exp(module.noise_loc.detach()) ** 2 + NOISE_FLOOR ** 2))


def _summary(modes: torch.Tensor) -> GuideSummary:
    """Modes (N, K, 2) as the start of a Levenberg-Marquardt search."""
    return GuideSummary(modes[..., 0], torch.ones_like(modes[..., 0]), modes[..., 1], torch.ones_like(modes[..., 1]))


def refine(module: MixturePDE, data: CohortTensors, start: torch.Tensor | None = None,
           n_iter: int = 2) -> tuple[RefinedPosterior, LaplaceFit]:
    """The semi-amortized guide of ``data``'s subjects: the Laplace approximation at each
    (subject, component) mode, found by ``n_iter`` Levenberg-Marquardt iterations from ``start``
    (N, K, 2) (default: the encoder's guess) at the module's current noise and population prior.
    Returns the refined posterior (in the data's dtype) and the Laplace fit. Rows whose search
    produced non-finite values fall back to the encoder's guide."""
    summary = _summary(start) if start is not None else None
    fit = laplace_fit(module, data, noise_sd(module), n_iter=n_iter, two_level=True, start=summary)
    loc, cov = fit.mean.to(data.signal.dtype), fit.cov.to(data.signal.dtype)
    bad = ~(torch.isfinite(loc).all(-1) & torch.isfinite(cov).flatten(-2).all(-1) & (cov[..., 0, 0] > 0)
            & (cov[..., 0, 0] * cov[..., 1, 1] - cov[..., 0, 1] ** 2 > 0))
    if bad.any():
        with torch.no_grad():
            guide = encode_cohort(module, data)
        enc_loc = torch.stack([guide.d_loc, torch.nan_to_num(guide.r_loc)], -1)
        enc_var = torch.stack([guide.d_scale, torch.nan_to_num(guide.r_scale, nan=1.0)], -1) ** 2
        loc = torch.where(bad[..., None], enc_loc, loc)
        cov = torch.where(bad[..., None, None], torch.diag_embed(enc_var), cov)
    return RefinedPosterior(loc, cov), fit


def evaluate_elbo(module: MixturePDE, data: CohortTensors, refined: RefinedPosterior | None = None,
                  n_draws: int = 4, seed: int = 0, batch_size: int = 256) -> tuple[float, float]:
    """ELBO per subject of ``data`` (mean and MC standard error over ``n_draws`` guide draws).

    ``refined``: the semi-amortized guide's local factors (default: the encoder's guide). The
    draws use their own seeded RNG (common random numbers), so two calls on the same data
    differ only by the parameters.
    """
    elbo = _elbo()
    n = data.n_subjects
    values = []
    with torch.no_grad(), torch.random.fork_rng(devices=[] if data.signal.device.type == "cpu"
                                                else [data.signal.device]):
        pyro.set_rng_seed(seed)
        for _ in range(n_draws):
            total = 0.0
            for start in range(0, n, batch_size):
                idx = torch.arange(start, min(start + batch_size, n), device=data.signal.device)
                part = None if refined is None else RefinedPosterior(refined.loc[idx], refined.cov[idx])
                try:
                    total += elbo.loss(module.model, module.guide, data.signal[idx], data.times[idx],
                                       data.observed[idx], idx, n, refined=part) * len(idx) / n
                except ValueError:  # a distribution validated non-finite parameters
                    total = math.nan
            values.append(-total / n)
    values = np.asarray(values)
    se = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan
    return float(values.mean()), se


def evaluate_loss(module: MixturePDE, data: CohortTensors, batch_size: int = 256) -> float:
    """Negative ELBO per subject under the encoder's guide (one draw), no parameter update."""
    return -evaluate_elbo(module, data, None, n_draws=1, seed=int(torch.randint(2 ** 31, ())),
                          batch_size=batch_size)[0]


def _finite_grads(params) -> bool:
    return all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params)


class _Trainer:
    """One fit of one module (one restart); ``train`` drives restarts and checkpoints."""

    def __init__(self, module: MixturePDE, data: CohortTensors, config: TrainConfig, device: torch.device):
        self.module, self.config, self.device = module, config, device
        split_seed = config.seed if config.split_seed is None else config.split_seed
        train_idx, val_idx = split_indices(data.n_subjects, config.validation_fraction, split_seed)
        self.train_data, self.val_data = data.subset(train_idx), data.subset(val_idx)
        self.n_train = self.train_data.n_subjects
        semi = config.guide == "semi-amortized"
        # Semi-amortized, the mixture weights are set by EM from the evidences (see update_population):
        # inside the ELBO, with every component's q_k a component-conditional posterior, the
        # enumerated responsibilities compare likelihoods at draws instead of evidences, which
        # favours the more flexible mechanisms.
        wake_params = [module.noise_loc, module.noise_scale_raw] if semi else list(module.parameters())
        self.wake_opt = torch.optim.Adam(wake_params, lr=config.learning_rate)
        self.encoder_opt = torch.optim.Adam(module.encoder.parameters(), lr=config.encoder_learning_rate)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.elbo = _elbo()
        self.train_modes: torch.Tensor | None = None  # (N_train, K, 2) last modes
        self.val_modes: torch.Tensor | None = None
        self.last_fit: LaplaceFit | None = None  # the training subjects' Laplace fits of the last epoch

    # ------------------------------------------------------------------ steps
    def _apply(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, params) -> bool:
        """Backward and step if everything is finite; False (nothing changed) otherwise."""
        if not torch.isfinite(loss):
            return False
        optimizer.zero_grad()
        loss.backward()
        if not _finite_grads(params):
            optimizer.zero_grad()
            return False
        torch.nn.utils.clip_grad_norm_(params, self.config.clip_norm)
        optimizer.step()
        return True

    def sleep_step(self) -> bool:
        c, m, d = self.config, self.module, self.train_data
        pick = torch.randint(self.n_train, (c.sleep_batch_size,), generator=self.generator).to(self.device)
        noise = torch.exp(m.noise_loc.detach())
        try:
            loss = m.sleep_loss(d.signal[pick, 0], d.times[pick], d.observed[pick], noise)
        except ValueError:  # a distribution validated non-finite parameters
            return False
        return self._apply(loss, self.encoder_opt, list(m.encoder.parameters()))

    def distill_step(self, idx: torch.Tensor, refined: RefinedPosterior) -> bool:
        d = self.train_data
        loss = self.module.distillation_loss(d.signal[idx], d.times[idx], d.observed[idx], refined)
        return self._apply(loss, self.encoder_opt, list(self.module.encoder.parameters()))

    def wake_step(self, idx: torch.Tensor, refined: RefinedPosterior | None) -> float:
        d = self.train_data
        params = [p for group in self.wake_opt.param_groups for p in group["params"]]
        try:
            loss = self.elbo.differentiable_loss(self.module.model, self.module.guide, d.signal[idx], d.times[idx],
                                                 d.observed[idx], idx, self.n_train, refined=refined)
        except ValueError:  # Pyro's validation of a distribution that received NaN/inf
            return math.nan
        value = float(loss.detach())
        return value if self._apply(loss, self.wake_opt, params) else math.nan

    # ------------------------------------------------------------------ phases
    def warm_up(self) -> None:
        c = self.config
        bar = tqdm(range(c.warmup_sleep_steps), desc="warm-up (simulated subjects)", unit="step",
                   disable=not c.progress, leave=False)
        for _ in bar:
            self.sleep_step()
        bar.close()

    def least_squares_pass(self) -> None:
        """Modes of every subject by global search; noise and weights from them; distillation."""
        c, m = self.config, self.module
        data = self._all()
        with torch.no_grad():
            guide = encode_cohort(m, data)
        sd = math.sqrt(m.priors.noise_median ** 2 + NOISE_FLOOR ** 2)
        search = search_modes(m, data, sd, grid_size=c.search_grid, start=guide, dtype=data.signal.dtype,
                              tolerance=1e-2, max_iter=8)
        n_tr = self.n_train
        variance = max(pooled_residual_variance(search.sse[:n_tr], search.n_obs[:n_tr]) or sd ** 2, NOISE_FLOOR ** 2)
        # The population priors and weights by EM on the Laplace approximations at the data's noise
        # (no solves), then a local search under them.
        cov, log_evidence = laplace_evidence(search.mean[..., 0], search.mean[..., 1], *search.jtj.unbind(-1),
                                             search.sse, search.n_obs, variance,
                                             m.prior_terms(torch.float64, search.mean.device), search.has_rate)
        search = dataclasses.replace(search, cov=cov, log_evidence=log_evidence)
        self.update_population(search, variance, update_weights=True, n_iter=50)
        sd = math.sqrt(variance)
        search = search_modes(m, data, sd, start=_summary(search.mean.to(data.signal.dtype)), grid=False,
                              dtype=data.signal.dtype, tolerance=1e-2, max_iter=4)
        variance = pooled_residual_variance(search.sse[:n_tr], search.n_obs[:n_tr]) or variance
        weights = self.update_population(search, sd ** 2, update_weights=True, n_iter=20)
        noise = math.sqrt(max(variance - NOISE_FLOOR ** 2, 1e-8))
        # The posterior sd of log(noise) from n observed values is about 1 / sqrt(2 n).
        n_values = float(search.n_obs[:n_tr].sum())
        log_sd = 1.0 / math.sqrt(2.0 * max(n_values, 1.0))
        with torch.no_grad():
            m.noise_loc.fill_(math.log(noise))
            m.noise_scale_raw.fill_(math.log(math.expm1(max(log_sd - 1e-4, 1e-6))))
        modes = search.mean.to(data.signal.dtype)
        self.train_modes, self.val_modes = modes[:n_tr].clone(), modes[n_tr:].clone()
        self.last_fit = search
        self.initial_noise, self.initial_weights = noise, weights.tolist()
        if c.guide != "semi-amortized" or not c.distill_steps:
            return
        refined = RefinedPosterior(search.mean.to(data.signal.dtype)[:n_tr], search.cov.to(data.signal.dtype)[:n_tr])
        bar = tqdm(range(c.distill_steps), desc="encoder on the modes", unit="step", disable=not c.progress,
                   leave=False)
        for _ in bar:
            idx = torch.randint(n_tr, (min(c.batch_size, n_tr),), generator=self.generator).to(self.device)
            self.distill_step(idx, RefinedPosterior(refined.loc[idx], refined.cov[idx]))
        bar.close()

    def update_population(self, fit: LaplaceFit, variance: float, weights: torch.Tensor | None = None,
                          update_weights: bool = False, n_iter: int = 10) -> torch.Tensor:
        """EM step(s) of the population priors from the training subjects' Laplace approximations
        ``fit`` (the first ``n_train`` rows; made under the module's current population prior at
        observation variance ``variance``); returns the mixture weights used (updated if asked)."""
        m = self.module
        n_tr = self.n_train
        if weights is None:
            with torch.no_grad():
                conc = m.weights_concentration().double()
            weights = conc / conc.sum()
        current = Population(m.population_loc.double(), m.population_scale.double())
        pop, weights, resp, _ = em_population(fit.mean[:n_tr], fit.jtj[:n_tr], variance, fit.log_evidence[:n_tr],
                                              current, m.priors, fit.has_rate, weights=weights.to(fit.mean.device),
                                              n_iter=n_iter, update_weights=update_weights,
                                              update_population=self.config.learn_population)
        with torch.no_grad():
            m.population_loc.copy_(pop.loc.to(m.population_loc))
            m.population_scale.copy_(pop.scale.to(m.population_scale))
            m.population_learned.fill_(self.config.learn_population)
            if update_weights:  # q(w) = Dirichlet(c + sum_i p(subtype_i = k | x_i)): the collapsed model's update
                m.weights_log_concentration.copy_(torch.log(m.priors.weights_concentration + resp.sum(0)).to(
                    m.weights_log_concentration))
        return weights

    def _all(self) -> CohortTensors:
        t, v = self.train_data, self.val_data
        return CohortTensors(t.subjects + v.subjects, torch.cat([t.signal, v.signal]), torch.cat([t.times, v.times]),
                             torch.cat([t.observed, v.observed]))

    def epoch(self, epoch: int) -> dict:
        c, d = self.config, self.train_data
        semi = c.guide == "semi-amortized"
        self.generator.manual_seed(c.seed + 7919 * (epoch + 1))  # per epoch, so resuming repeats it exactly
        perm = torch.randperm(self.n_train, generator=self.generator)
        losses, skipped, steps, fits = [], 0, 0, []
        variance = noise_sd(self.module) ** 2  # the refinements' noise: the globals change within the epoch
        for step, start in enumerate(range(0, self.n_train, c.batch_size)):
            idx = perm[start:start + c.batch_size].to(self.device)
            refined = None
            if semi:
                refined, fit = refine(self.module, d.subset(idx.cpu()).to(self.device), self.train_modes[idx],
                                      n_iter=c.refine_iterations)
                self.train_modes[idx] = refined.loc.detach()
                fits.append((idx, fit))
            loss = self.wake_step(idx, refined)
            steps += 1
            if math.isfinite(loss):
                losses.append(loss / self.n_train)
            else:
                skipped += 1
            if semi:
                self.distill_step(idx, refined)
            if c.sleep_every and step % c.sleep_every == 0:
                self.sleep_step()
        record = {"epoch": epoch, "train_elbo": -float(np.mean(losses)) if losses else math.nan,
                  "skipped_steps": skipped, "steps": steps}
        if semi and fits:  # the M-step of the population priors from this epoch's Laplace approximations
            order = torch.cat([i for i, _ in fits]).argsort()
            joined = LaplaceFit(*(torch.cat([getattr(f, name) for _, f in fits])[order] if name != "has_rate"
                                  else fits[0][1].has_rate for name in ("mean", "cov", "log_evidence", "sse", "n_obs",
                                                                       "has_rate", "jtj")))
            if bool(torch.isfinite(joined.mean).all() & torch.isfinite(joined.log_evidence).all()):
                self.update_population(joined, variance, update_weights=True)
                self.last_fit = joined
            record["population_loc"] = self.module.population_loc.tolist()
            record["population_scale"] = self.module.population_scale.tolist()
        data = self.val_data if self.val_data.n_subjects else d
        if semi:
            modes = self.val_modes if self.val_data.n_subjects else self.train_modes
            refined, _ = refine(self.module, data, modes, n_iter=c.refine_iterations)
            if self.val_data.n_subjects:
                self.val_modes = refined.loc.detach()
        else:
            refined = None
        value, se = evaluate_elbo(self.module, data, refined, n_draws=c.validation_draws, seed=c.seed + 1)
        record["val_elbo"], record["val_elbo_se"] = value, se
        if semi:  # the encoder's own guide, on the same subjects: how good the amortized guess is
            record["val_elbo_amortized"] = evaluate_elbo(self.module, data, None, n_draws=1, seed=c.seed + 2)[0]
        return record


def _plateau(values: list[float], window: int, tolerance: float) -> tuple[bool, float]:
    """Whether the last ``window`` values improved the best before them by less than ``tolerance``,
    and the slope (per epoch) of a line through the exponentially smoothed last ``window + 1``."""
    smooth, out = None, []
    for v in values:
        smooth = v if smooth is None else 0.5 * smooth + 0.5 * v
        out.append(smooth)
    tail = out[-(window + 1):]
    slope = float(np.polyfit(np.arange(len(tail)), tail, 1)[0]) if len(tail) > 1 else math.nan
    if len(values) <= window:
        return False, slope
    before, recent = max(values[:-window]), max(values[-window:])
    return recent - before < tolerance, slope


def _save_checkpoint(path: Path, trainer: _Trainer, state: TrainState, best_state: dict, config: TrainConfig,
                     finished: dict | None) -> None:
    from ..data.contract import atomic_write

    payload = {"module": trainer.module.state_dict(), "wake_optimizer": trainer.wake_opt.state_dict(),
               "encoder_optimizer": trainer.encoder_opt.state_dict(), "state": asdict(state),
               "best_module": best_state, "config": asdict(config), "torch_rng": torch.get_rng_state(),
               "train_modes": trainer.train_modes, "val_modes": trainer.val_modes, "finished": finished}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def _set_lr(trainer: _Trainer, scale: float, config: TrainConfig) -> None:
    for group in trainer.wake_opt.param_groups:
        group["lr"] = config.learning_rate * scale
    for group in trainer.encoder_opt.param_groups:
        group["lr"] = config.encoder_learning_rate * scale


def train(module: MixturePDE, data: CohortTensors, config: TrainConfig | None = None,
          checkpoint_dir: str | os.PathLike | None = None, resume: bool = False) -> TrainState:
    """Fit ``module`` to ``data``; returns the training state (history and convergence diagnostics).

    The module ends with the parameters of the best validation epoch of the best restart. With
    ``checkpoint_dir``, a checkpoint is written atomically after every epoch and ``resume=True``
    continues from it (the same restart and epoch, with the same random numbers). ``config``:
    ``TrainConfig()`` (the defaults) when not given.
    """
    config = TrainConfig() if config is None else config
    device = torch.device(config.device)
    module.to(device)
    data = data.to(device)
    checkpoint = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir else None
    payload = None
    if resume:
        if checkpoint is None or not checkpoint.exists():
            raise MissingFileError(f"--resume: no checkpoint at {checkpoint}; start without --resume")
        payload = torch.load(checkpoint, map_location=device, weights_only=False)
        if "wake_optimizer" not in payload:
            raise TrainingDivergedError(f"{checkpoint} was written by an older version of pyrovae_pde "
                                        "(before semi-amortized training); start the fit again without --resume")
    finished = payload["finished"] if payload else None  # best finished restart: {"state", "module"}
    first_restart = TrainState(**payload["state"]).restart if payload else 0
    for restart in range(first_restart, config.restarts):
        run_config = dataclasses.replace(config, seed=config.seed + 1009 * restart,
                                         split_seed=config.seed if config.split_seed is None else config.split_seed)
        if restart > first_restart or payload is None:
            module.reinitialize(run_config.seed)
            payload = None
        state, best = _train_once(module, data, run_config, checkpoint, payload, restart, finished)
        payload = None
        elbos = (finished["state"].restart_elbos if finished else []) + [-state.best_val]
        state.restart_elbos = elbos
        if finished is None or state.best_val < finished["state"].best_val:
            finished = {"state": state, "module": best}
        finished["state"].restart_elbos = elbos
    state = finished["state"]
    module.load_state_dict(finished["module"])
    if checkpoint is not None and config.restarts > 1:  # record the restarts' outcome for --resume
        trainer = _Trainer(module, data, config, device)
        _save_checkpoint(checkpoint, trainer, state, finished["module"], config, finished)
    return state


def _train_once(module: MixturePDE, data: CohortTensors, config: TrainConfig, checkpoint: Path | None,
                payload: dict | None, restart: int, finished: dict | None) -> tuple[TrainState, dict]:
    device = torch.device(config.device)
    pyro.clear_param_store()
    pyro.set_rng_seed(config.seed)
    trainer = _Trainer(module, data, config, device)
    state = TrainState(restart=restart)
    if payload is not None:
        module.load_state_dict(payload["module"])
        trainer.wake_opt.load_state_dict(payload["wake_optimizer"])
        trainer.encoder_opt.load_state_dict(payload["encoder_optimizer"])
        state = TrainState(**payload["state"])
        best_state = payload["best_module"]
        trainer.train_modes, trainer.val_modes = payload["train_modes"], payload["val_modes"]
        torch.set_rng_state(payload["torch_rng"])
        _set_lr(trainer, state.lr_scale, config)
    else:
        if config.warmup_sleep_steps:
            trainer.warm_up()
        trainer.least_squares_pass()
        state.initial_noise, state.initial_weights = trainer.initial_noise, trainer.initial_weights
        best_state = copy.deepcopy(module.state_dict())
    best_modes = (trainer.train_modes, trainer.val_modes)
    if state.stop_reason == "plateau" or state.epoch >= config.epochs:
        return state, best_state  # this restart had already finished
    state.converged = False
    state.stop_reason = "running"
    desc = "fit" if config.restarts == 1 else f"fit (restart {restart + 1})"
    bar = tqdm(range(state.epoch, config.epochs), desc=desc,
               unit="epoch", disable=not config.progress, initial=state.epoch, total=config.epochs)
    for epoch in bar:
        record = trainer.epoch(epoch)
        state.skipped_steps += record["skipped_steps"]
        val_loss = -record["val_elbo"]
        se = record["val_elbo_se"] if math.isfinite(record["val_elbo_se"]) else 0.0
        collapsed = (not math.isfinite(val_loss) or record["skipped_steps"] > 0.25 * record["steps"]
                     or (math.isfinite(state.best_val) and val_loss > state.best_val + config.rollback_drop + 3 * se))
        record["lr_scale"] = state.lr_scale
        state.history.append(record)
        state.epoch = epoch + 1
        if collapsed:
            state.rollbacks += 1
            if state.rollbacks > config.max_rollbacks:
                module.load_state_dict(best_state)
                state.stop_reason = "diverged"
                where = f"; the last good checkpoint is kept at {checkpoint}" if checkpoint else ""
                raise TrainingDivergedError(
                    f"training diverged at epoch {epoch} (validation ELBO {record['val_elbo']:.4g}, "
                    f"{record['skipped_steps']} of {record['steps']} steps non-finite) after {config.max_rollbacks} "
                    f"roll-backs with halved learning rates{where}. Check the data for extreme values, "
                    "or lower the learning rate (--lr)")
            module.load_state_dict(best_state)
            trainer.train_modes, trainer.val_modes = (m.clone() if m is not None else None for m in best_modes)
            state.lr_scale *= 0.5
            _set_lr(trainer, state.lr_scale, config)
        elif val_loss < state.best_val:
            state.best_val, state.best_epoch = val_loss, epoch
            best_state = copy.deepcopy(module.state_dict())
            best_modes = tuple(m.clone() if m is not None else None for m in (trainer.train_modes, trainer.val_modes))
        values = [r["val_elbo"] for r in state.history if math.isfinite(r["val_elbo"])]
        # improvements within twice the validation ELBO's MC error are not improvements
        plateau, state.elbo_slope = _plateau(values, config.plateau_window, max(config.plateau_tolerance, 2 * se))
        bar.set_postfix({k: f"{record[k]:.4g}" for k in ("train_elbo", "val_elbo") if k in record})
        done = plateau and state.epoch >= config.min_epochs and not collapsed
        if done:
            state.converged, state.stopped_early, state.stop_reason = True, state.epoch < config.epochs, "plateau"
        elif state.epoch >= config.epochs:
            state.stop_reason = "max_epochs"
        if checkpoint is not None:
            _save_checkpoint(checkpoint, trainer, state, best_state, config, finished)
        if done:
            break
    bar.close()
    if state.stop_reason == "running":
        state.stop_reason = "max_epochs"
    module.load_state_dict(best_state)
    if trainer.last_fit is not None:
        fit = trainer.last_fit
        n_tr = trainer.n_train
        with torch.no_grad():
            weights = module.weights_concentration().double().cpu()
        checks = prior_conflict(module.priors, fit.mean[:n_tr], fit.log_evidence[:n_tr], weights / weights.sum(),
                                fit.has_rate, fit.n_obs[:n_tr])
        state.prior_check = [c.as_dict() for c in checks]
    return state, best_state
