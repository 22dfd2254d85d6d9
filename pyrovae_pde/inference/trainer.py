"""One fit of one module (one restart): the warm-up on simulated subjects, the least-squares pass
(global mode search, EM for the population priors and weights, noise from the pooled residual,
encoder distillation), and the epochs' wake, distillation and sleep steps. ``train.train`` drives
restarts, roll-backs, stopping and checkpoints."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.cohort import CohortTensors, LazyCohort
from ..errors import InputError
from ..model.likelihood import NOISE_FLOOR
from ..model.module import MixturePDE, RefinedPosterior
from . import distributed as ddp
from .encoding import encode_cohort
from .laplace import LaplaceFit, laplace_evidence, pooled_residual_variance
from .objective import evaluate_elbo, finite_grads, modes_as_start, noise_sd, refine, trace_elbo
from .population import Population, em_population
from .search import search_modes
from .train_config import TrainConfig, split_indices


@dataclasses.dataclass
class TrainingShard:
    """The training and validation subjects whose signal this rank holds (all of them in one
    process): ``train`` and ``val``, at the positions ``train_rows`` and ``val_rows`` (ascending) of
    their sets; distributed, rank r of P holds the positions r, r + P, ... of each set
    (``distributed.own_rows``), position j at row j // P. ``n_train``, ``n_val``: the sets' sizes."""

    train: CohortTensors
    val: CohortTensors
    n_train: int
    n_val: int
    train_rows: torch.Tensor
    val_rows: torch.Tensor

    @classmethod
    def of(cls, data: CohortTensors | LazyCohort, config: TrainConfig, device: torch.device) -> "TrainingShard":
        """The train/validation split of ``data`` (``split_indices``) and this rank's subjects of each,
        read from a ``LazyCohort`` (only those) or taken from ``CohortTensors``, on ``device``."""
        split_seed = config.seed if config.split_seed is None else config.split_seed
        train_idx, val_idx = split_indices(data.n_subjects, config.validation_fraction, split_seed)
        n_train, n_val = len(train_idx), len(val_idx)
        world = ddp.world_size() if config.distributed else 1
        if world == 1:
            return cls(data.subset(train_idx).to(device), data.subset(val_idx).to(device), n_train, n_val,
                       torch.arange(n_train), torch.arange(n_val))
        for name, n in (("training", n_train), ("validation", n_val)):
            if 0 < n < world:
                raise InputError(f"--distributed on {world} ranks: the {name} set has {n} subjects, fewer than the "
                                 f"ranks; use at most {n} ranks or a larger cohort")
        rows = ddp.own_rows(n_train), ddp.own_rows(n_val)

        def read() -> tuple[CohortTensors, CohortTensors]:
            return tuple(data.subset(idx[own.numpy()]).to(device) for idx, own in zip((train_idx, val_idx), rows))

        return cls(*ddp.together(read), n_train, n_val, *rows)


class Trainer:
    """One fit of one module (one restart) on this rank's ``shard``; ``train`` drives restarts and checkpoints."""

    def __init__(self, module: MixturePDE, shard: TrainingShard, config: TrainConfig, device: torch.device):
        self.module, self.config, self.device = module, config, device
        self.train_data, self.val_data = shard.train, shard.val  # the held subjects (see TrainingShard)
        self.n_train, self.n_val = shard.n_train, shard.n_val
        semi = config.guide == "semi-amortized"
        # Semi-amortized, the mixture weights are set by EM from the evidences (see update_population):
        # inside the ELBO, with every component's q_k a component-conditional posterior, the
        # enumerated responsibilities compare likelihoods at draws instead of evidences, which
        # favours the more flexible mechanisms.
        wake_params = [module.noise_loc, module.noise_scale_raw] if semi else list(module.parameters())
        self.wake_opt = torch.optim.Adam(wake_params, lr=config.learning_rate)
        self.encoder_opt = torch.optim.Adam(module.encoder.parameters(), lr=config.encoder_learning_rate)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.elbo = trace_elbo()
        self.train_modes: torch.Tensor | None = None  # (N_train, K, 2) last modes
        self.val_modes: torch.Tensor | None = None
        self.last_fit: LaplaceFit | None = None  # the training subjects' Laplace fits of the last epoch
        # data-parallel (distributed.py): this rank's share of every global batch, the rest all-reduced/gathered
        self.world = ddp.world_size() if config.distributed else 1
        self.train_rows, self.val_rows = shard.train_rows, shard.val_rows  # the positions held

    def _rows(self, idx: torch.Tensor) -> torch.Tensor:
        """The rows of the held data (train_data, val_data) of the positions ``idx`` this rank holds."""
        return idx if self.world == 1 else idx // self.world

    # ------------------------------------------------------------------ steps
    def _apply(self, loss: torch.Tensor | None, optimizer: torch.optim.Optimizer, params) -> bool:
        """Backward and step if everything is finite; False (nothing changed) otherwise. Distributed,
        ``loss`` is this rank's share-weighted part (None: no subjects here) and the gradients are
        summed over the ranks first (every rank then decides alike)."""
        if self.world > 1:
            optimizer.zero_grad()
            finite = loss is None or bool(torch.isfinite(loss))
            if loss is not None and finite:
                loss.backward()
            self.last_loss = ddp.reduce_gradients(params, 0.0 if loss is None else float(loss.detach()), finite)
            if not math.isfinite(self.last_loss):
                optimizer.zero_grad()
                return False
        else:
            if not torch.isfinite(loss):
                return False
            optimizer.zero_grad()
            loss.backward()
        if not finite_grads(params):
            optimizer.zero_grad()
            return False
        torch.nn.utils.clip_grad_norm_(params, self.config.clip_norm)
        optimizer.step()
        return True

    def sleep_step(self) -> bool:
        c, m, d = self.config, self.module, self.train_data
        pick = torch.randint(self.n_train, (c.sleep_batch_size,), generator=self.generator).to(self.device)
        noise = torch.exp(m.noise_loc.detach())
        if self.world > 1:  # the batch's draws on every rank, this rank's subjects solved
            mine, positions = ddp.owned(pick)
            rows = self._rows(mine)
            try:
                loss = ddp.sleep_loss_shard(m, d.signal[rows, 0], d.times[rows], d.observed[rows], noise, positions,
                                            len(pick))
            except ValueError:
                loss = torch.tensor(math.nan)
            return self._apply(loss, self.encoder_opt, list(m.encoder.parameters()))
        try:
            loss = m.sleep_loss(d.signal[pick, 0], d.times[pick], d.observed[pick], noise)
        except ValueError:  # a distribution validated non-finite parameters
            return False
        return self._apply(loss, self.encoder_opt, list(m.encoder.parameters()))

    def distill_step(self, idx: torch.Tensor, refined: RefinedPosterior, share: float = 1.0) -> bool:
        """``share``: distributed, this rank's part of the global batch (idx: its subjects of the batch)."""
        d, rows = self.train_data, self._rows(idx)
        loss = None
        if len(idx):  # share 1.0 (single process) leaves the loss bit for bit as it is
            loss = self.module.distillation_loss(d.signal[rows], d.times[rows], d.observed[rows], refined) * share
        return self._apply(loss, self.encoder_opt, list(self.module.encoder.parameters()))

    def wake_step(self, idx: torch.Tensor, refined: RefinedPosterior | None,
                  positions: torch.Tensor | None = None, batch: int | None = None) -> float:
        """Distributed: ``idx`` is this rank's shard, at ``positions`` of a global batch of ``batch``;
        returns the global batch's loss."""
        d = self.train_data
        params = [p for group in self.wake_opt.param_groups for p in group["params"]]
        if self.world > 1:
            loss, rows = None, self._rows(idx)
            if len(idx):
                try:
                    with ddp.SharedDraws(positions, batch):
                        loss = self.elbo.differentiable_loss(self.module.model, self.module.guide, d.signal[rows],
                                                             d.times[rows], d.observed[rows], idx, self.n_train,
                                                             refined=refined) * (len(idx) / batch)
                except ValueError:
                    loss = torch.tensor(math.nan)
            else:  # none of the batch's subjects here: its draws all the same, to keep the RNG in step
                ddp.skip_draws(self.module, batch, d.signal.dtype)
            return self.last_loss if self._apply(loss, self.wake_opt, params) else math.nan
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
        mine = self._all()  # the held training then validation subjects, at these positions of the two sets:
        rows = torch.cat([self.train_rows, self.n_train + self.val_rows])
        with torch.no_grad():
            guide = encode_cohort(m, mine)
        sd = math.sqrt(m.priors.noise_median ** 2 + NOISE_FLOOR ** 2)
        search = self._gather(rows, search_modes(m, mine, sd, grid_size=c.search_grid, start=guide,
                                                 dtype=mine.signal.dtype, tolerance=1e-2, max_iter=8))
        n_tr = self.n_train
        variance = max(pooled_residual_variance(search.sse[:n_tr], search.n_obs[:n_tr]) or sd ** 2, NOISE_FLOOR ** 2)
        # The population priors and weights by EM on the Laplace approximations at the data's noise
        # (no solves), then a local search under them.
        cov, log_evidence = laplace_evidence(search.mean[..., 0], search.mean[..., 1], *search.jtj.unbind(-1),
                                             search.sse, search.n_obs, variance,
                                             m.prior_terms(torch.float64, search.mean.device), search.has_rate)
        search = dataclasses.replace(search, cov=cov, log_evidence=log_evidence, variance=variance)
        self.update_population(search, variance, update_weights=True, n_iter=50)
        sd = math.sqrt(variance)
        start = modes_as_start(search.mean[rows.to(search.mean.device)].to(mine.signal.dtype))
        search = self._gather(rows, search_modes(m, mine, sd, start=start, grid=False, dtype=mine.signal.dtype,
                                                 tolerance=1e-2, max_iter=4))
        variance = pooled_residual_variance(search.sse[:n_tr], search.n_obs[:n_tr]) or variance
        weights = self.update_population(search, sd ** 2, update_weights=True, n_iter=20)
        noise = math.sqrt(max(variance - NOISE_FLOOR ** 2, 1e-8))
        # The posterior sd of log(noise) from n observed values is about 1 / sqrt(2 n).
        n_values = float(search.n_obs[:n_tr].sum())
        log_sd = 1.0 / math.sqrt(2.0 * max(n_values, 1.0))
        with torch.no_grad():
            m.noise_loc.fill_(math.log(noise))
            m.noise_scale_raw.fill_(math.log(math.expm1(max(log_sd - 1e-4, 1e-6))))
        dtype = mine.signal.dtype
        modes = search.mean.to(dtype)
        self.train_modes, self.val_modes = modes[:n_tr].clone(), modes[n_tr:].clone()
        self.last_fit = search
        self.initial_noise, self.initial_weights = noise, weights.tolist()
        if c.guide != "semi-amortized" or not c.distill_steps:
            return
        refined = RefinedPosterior(search.mean.to(dtype)[:n_tr], search.cov.to(dtype)[:n_tr])
        bar = tqdm(range(c.distill_steps), desc="encoder on the modes", unit="step", disable=not c.progress,
                   leave=False)
        for _ in bar:
            idx = torch.randint(n_tr, (min(c.batch_size, n_tr),), generator=self.generator).to(self.device)
            share = 1.0
            if self.world > 1:
                own = ddp.owned(idx)[0]
                share, idx = len(own) / len(idx), own
            self.distill_step(idx, RefinedPosterior(refined.loc[idx], refined.cov[idx]), share)
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
        current = Population.of(m)
        tied = self.config.tie_population
        pop, weights, resp, _ = em_population(fit.mean[:n_tr], fit.jtj[:n_tr], variance, fit.log_evidence[:n_tr],
                                              current, m.priors, fit.has_rate, weights=weights.to(fit.mean.device),
                                              n_iter=n_iter, update_weights=update_weights,
                                              update_population=self.config.learn_population, tied=tied,
                                              n_terms=self.config.population_terms if tied else 1)
        with torch.no_grad():
            m.set_population(pop.loc, pop.scale, pop.terms)
            m.population_learned.fill_(self.config.learn_population)
            m.population_tied.fill_(self.config.learn_population and self.config.tie_population)
            if update_weights:  # q(w) = Dirichlet(c + sum_i p(subtype_i = k | x_i)): the collapsed model's update
                m.weights_log_concentration.copy_(torch.log(m.priors.weights_concentration + resp.sum(0)).to(
                    m.weights_log_concentration))
        return weights

    def _gather(self, rows: torch.Tensor, fit: LaplaceFit) -> LaplaceFit:
        """Distributed: every rank's per-subject ``fit`` of its ``rows``, joined in subject order (the
        same on every rank); single-process: ``fit`` itself."""
        if self.world == 1:
            return fit
        return self._join_fits(ddp.all_gather_objects((rows, fit)))

    def _join_fits(self, parts: list[tuple[torch.Tensor, LaplaceFit]]) -> LaplaceFit:
        """One LaplaceFit of the (rows, fit) ``parts``, rows in ascending order, on this device."""
        order = torch.cat([r for r, _ in parts]).argsort()
        first = parts[0][1]
        joined = {}
        for f in dataclasses.fields(first):
            value = getattr(first, f.name)
            if isinstance(value, torch.Tensor) and f.name != "has_rate":
                value = torch.cat([getattr(p, f.name) for _, p in parts])[order]
            joined[f.name] = value.to(self.device) if isinstance(value, torch.Tensor) else value
        return dataclasses.replace(first, **joined)

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
            batch, positions = len(idx), None
            if self.world > 1:  # this rank's subjects of the global minibatch
                idx, positions = ddp.owned(idx)
            refined = None
            if semi and len(idx):
                refined, fit = refine(self.module, d.subset(self._rows(idx).cpu()), self.train_modes[idx],
                                      n_iter=c.refine_iterations)
                self.train_modes[idx] = refined.loc.detach()
                fits.append((idx, fit, refined.loc.detach()))
            loss = self.wake_step(idx, refined, positions, batch) if self.world > 1 else self.wake_step(idx, refined)
            steps += 1
            if math.isfinite(loss):
                losses.append(loss / self.n_train)
            else:
                skipped += 1
            if semi:
                self.distill_step(idx, refined, len(idx) / batch)
            if c.sleep_every and step % c.sleep_every == 0:
                self.sleep_step()
        record = {"epoch": epoch, "train_elbo": -float(np.mean(losses)) if losses else math.nan,
                  "skipped_steps": skipped, "steps": steps}
        if semi and self.world > 1:  # every rank's refinements: the modes and fits of all training subjects
            fits = [f for part in ddp.all_gather_objects(fits) for f in part]
            fits = [(i.to(self.device), f, f_loc.to(self.device)) for i, f, f_loc in fits]
            for i, _, f_loc in fits:
                self.train_modes[i] = f_loc
        if semi and fits:  # the M-step of the population priors from this epoch's Laplace approximations
            joined = self._join_fits([(i, f) for i, f, _ in fits])
            if bool(torch.isfinite(joined.mean).all() & torch.isfinite(joined.log_evidence).all()):
                self.update_population(joined, variance, update_weights=True)
                self.last_fit = joined
            record["population_loc"] = self.module.population_loc.tolist()
            record["population_scale"] = self.module.population_scale.tolist()
            if self.module.population_terms > 1:  # (K, 2, M): weight, loc, scale of each term
                for name in ("population_term_weight", "population_term_loc", "population_term_scale"):
                    record[name] = getattr(self.module, name).tolist()
        validation = self.n_val > 0  # else the training subjects stand in
        data, rows = (self.val_data, self.val_rows) if validation else (d, self.train_rows)
        share = ddp.Share(rows, self.n_val if validation else self.n_train) if self.world > 1 else None
        refined = None
        if semi:
            modes = self.val_modes if validation else self.train_modes
            start = modes if share is None else modes[rows.to(modes.device)]
            refined, _ = refine(self.module, data, start, n_iter=c.refine_iterations)
            if validation:  # every rank's modes, in order
                self.val_modes = (refined.loc.detach() if share is None else
                                  ddp.gather_rows(share, refined.loc.detach())[0].to(self.device))
        # each rank's subjects; distributed, summed over the ranks (distributed.py)
        value, se = evaluate_elbo(self.module, data, refined, n_draws=c.validation_draws, seed=c.seed + 1, share=share)
        record["val_elbo"], record["val_elbo_se"] = value, se
        if semi:  # the encoder's own guide, on the same subjects: how good the amortized guess is
            record["val_elbo_amortized"] = evaluate_elbo(self.module, data, None, n_draws=1, seed=c.seed + 2,
                                                         share=share)[0]
        return record
