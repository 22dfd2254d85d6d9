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
6. **Amortization** (``amortize_steps``, ``amortize.amortize``): the encoder and its subtype head
   learn the fitted model's posteriors from subjects it simulates like the cohort's, so that
   ``predict`` can take the encoder alone for the subjects it can be trusted with. Not done in
   distributed fits (their predict refines every subject). Checkpoints hold the fit before this
   stage; a resumed run amortizes again (the same steps from the same seed).

``guide="amortized"`` trains the encoder by the wake-phase ELBO instead (the pre-0.2 scheme),
kept to measure against.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyro
import torch
from tqdm.auto import tqdm

from ..data.cohort import CohortTensors, LazyCohort
from ..data.contract import read_torch_file
from ..errors import MissingFileError, TrainingDivergedError
from ..model.module import MixturePDE
from . import distributed as ddp
from .amortize import amortize
from .objective import evaluate_elbo, noise_sd, refine
from .prior_check import prior_conflict
from .train_config import TrainConfig, TrainState
from .trainer import Trainer, TrainingShard

LOGGER = logging.getLogger(__name__)

__all__ = ["CHECKPOINT_NAME", "TrainConfig", "TrainState", "TrainingDivergedError", "train", "refine",
           "evaluate_elbo", "noise_sd"]

CHECKPOINT_NAME = "checkpoint.pt"


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


def _save_checkpoint(path: Path, trainer: Trainer, state: TrainState, best_state: dict, config: TrainConfig,
                     finished: dict | None) -> None:
    from ..data.contract import atomic_write

    payload = {"module": trainer.module.state_dict(), "wake_optimizer": trainer.wake_opt.state_dict(),
               "encoder_optimizer": trainer.encoder_opt.state_dict(), "state": asdict(state),
               "best_module": best_state, "config": asdict(config), "torch_rng": torch.get_rng_state(),
               "train_modes": trainer.train_modes, "val_modes": trainer.val_modes, "finished": finished,
               "world_size": trainer.world}
    if ddp.rank() != 0:  # only rank 0 writes (every rank holds the same state)
        return
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def _set_lr(trainer: Trainer, scale: float, config: TrainConfig) -> None:
    for group in trainer.wake_opt.param_groups:
        group["lr"] = config.learning_rate * scale
    for group in trainer.encoder_opt.param_groups:
        group["lr"] = config.encoder_learning_rate * scale


def train(module: MixturePDE, data: CohortTensors | LazyCohort, config: TrainConfig | None = None,
          checkpoint_dir: str | os.PathLike | None = None, resume: bool = False) -> TrainState:
    """Fit ``module`` to ``data``; returns the training state (history and convergence diagnostics).

    The module ends with the parameters of the best validation epoch of the best restart. With
    ``checkpoint_dir``, a checkpoint is written atomically after every epoch and ``resume=True``
    continues from it (the same restart and epoch, with the same random numbers). ``config``:
    ``TrainConfig()`` (the defaults) when not given. Distributed (``config.distributed``), each
    rank takes its own subjects of ``data``: from a ``LazyCohort`` it reads only those.
    """
    config = TrainConfig() if config is None else config
    with ddp.process_group(config.device, config.distributed_timeout, enabled=config.distributed):
        try:
            return _train(module, data, config, checkpoint_dir, resume)
        except Exception:
            if config.distributed and ddp.world_size() > 1:
                LOGGER.error("rank %d of %d failed; the other ranks stop at their next collective (within "
                             "distributed_timeout)", ddp.rank(), ddp.world_size())
            raise


def _train(module: MixturePDE, data: CohortTensors | LazyCohort, config: TrainConfig, checkpoint_dir,
           resume: bool) -> TrainState:
    if ddp.rank() != 0:  # progress bars and logs from rank 0 only
        config = dataclasses.replace(config, progress=False)
    device = torch.device(config.device)
    module.to(device)
    shard = TrainingShard.of(data, config, device)  # the restarts share the split (and the subjects read)
    checkpoint = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir else None
    payload = None
    if resume:
        payload = _read_checkpoint(checkpoint, device, config.distributed and ddp.world_size() > 1)
    finished = payload["finished"] if payload else None  # best finished restart: {"state", "module"}
    first_restart = TrainState(**payload["state"]).restart if payload else 0
    for restart in range(first_restart, config.restarts):
        run_config = dataclasses.replace(config, seed=config.seed + 1009 * restart,
                                         split_seed=config.seed if config.split_seed is None else config.split_seed)
        if restart > first_restart or payload is None:
            module.reinitialize(run_config.seed)
            payload = None
        state, best = _train_once(module, shard, run_config, checkpoint, payload, restart, finished)
        payload = None
        elbos = (finished["state"].restart_elbos if finished else []) + [-state.best_val]
        state.restart_elbos = elbos
        if finished is None or state.best_val < finished["state"].best_val:
            finished = {"state": state, "module": best}
        finished["state"].restart_elbos = elbos
    state = finished["state"]
    module.load_state_dict(finished["module"])
    if config.amortize_steps and ddp.world_size() == 1:  # distributed fits are not amortized (yet)
        report = amortize(module, shard.train, steps=config.amortize_steps, seed=config.seed,
                          progress=config.progress)
        state.amortization = report.as_dict()
        LOGGER.info("amortized posterior: %s", report.summary())
    if checkpoint is not None and config.restarts > 1:  # record the restarts' outcome for --resume
        trainer = Trainer(module, shard, config, device)
        _save_checkpoint(checkpoint, trainer, state, finished["module"], config, finished)
    return state


def _read_checkpoint(checkpoint: Path | None, device: torch.device, shared: bool) -> dict:
    """The checkpoint's payload; ``shared`` (distributed): read by rank 0 and sent to every rank (the
    other ranks need no copy of the run directory), errors raised on every rank alike."""
    error, payload = None, None
    if not shared or ddp.rank() == 0:
        try:
            if checkpoint is None or not checkpoint.exists():
                raise MissingFileError(f"--resume: no checkpoint at {checkpoint}; start without --resume")
            payload = read_torch_file(checkpoint, "start the fit again without --resume",
                                      map_location="cpu" if shared else device)
            if "wake_optimizer" not in payload:
                raise TrainingDivergedError(f"{checkpoint} was written by an older version of pyrovae_pde (before "
                                            "semi-amortized training); start the fit again without --resume")
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
            error = exc
    if shared:
        error, payload = ddp.broadcast_object((error, payload))
    if error is not None:
        raise error
    if shared:
        for key in ("train_modes", "val_modes"):
            if isinstance(payload.get(key), torch.Tensor):
                payload[key] = payload[key].to(device)
    return payload


def _start_or_resume(trainer: Trainer, config: TrainConfig, payload: dict | None,
                     restart: int) -> tuple[TrainState, dict]:
    """A fresh restart (warm-up and least-squares pass) or the state of a checkpoint's ``payload``."""
    module = trainer.module
    if payload is None:
        state = TrainState(restart=restart)
        if config.warmup_sleep_steps:
            trainer.warm_up()
        trainer.least_squares_pass()
        state.initial_noise, state.initial_weights = trainer.initial_noise, trainer.initial_weights
        return state, copy.deepcopy(module.state_dict())
    module.load_state_dict(payload["module"])
    trainer.wake_opt.load_state_dict(payload["wake_optimizer"])
    trainer.encoder_opt.load_state_dict(payload["encoder_optimizer"])
    state = TrainState(**payload["state"])
    trainer.train_modes, trainer.val_modes = payload["train_modes"], payload["val_modes"]
    torch.set_rng_state(payload["torch_rng"])
    _set_lr(trainer, state.lr_scale, config)
    return state, payload["best_module"]


def _record_prior_check(trainer: Trainer, state: TrainState) -> None:
    """The prior-data conflict check at the last epoch's modes of the training subjects."""
    module, fit, n_tr = trainer.module, trainer.last_fit, trainer.n_train
    if fit is None:
        return
    with torch.no_grad():
        weights = module.weights_concentration().double().cpu()
    checks = prior_conflict(module.priors, fit.mean[:n_tr], fit.log_evidence[:n_tr], weights / weights.sum(),
                            fit.has_rate, fit.n_obs[:n_tr])
    state.prior_check = [c.as_dict() for c in checks]


def _train_once(module: MixturePDE, shard: TrainingShard, config: TrainConfig, checkpoint: Path | None,
                payload: dict | None, restart: int, finished: dict | None) -> tuple[TrainState, dict]:
    device = torch.device(config.device)
    pyro.clear_param_store()
    pyro.set_rng_seed(config.seed)
    trainer = Trainer(module, shard, config, device)
    state, best_state = _start_or_resume(trainer, config, payload, restart)
    best_modes = (trainer.train_modes, trainer.val_modes)
    if state.stop_reason == "plateau" or state.epoch >= config.epochs:
        return state, best_state  # this restart had already finished
    state.converged = False
    state.stop_reason = "running"
    desc = "fit" if config.restarts == 1 else f"fit (restart {restart + 1})"
    bar = tqdm(range(state.epoch, config.epochs), desc=desc,
               unit="epoch", disable=not config.progress or ddp.rank() != 0, initial=state.epoch, total=config.epochs)
    for epoch in bar:
        started = time.perf_counter()
        record = trainer.epoch(epoch)
        record["seconds"] = time.perf_counter() - started  # wall time of the epoch, validation included
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
        if ddp.rank() == 0:
            LOGGER.info("%s: epoch %d/%d: train ELBO %.4g, validation ELBO %.4g +- %.2g%s", desc, state.epoch,
                        config.epochs, record.get("train_elbo", math.nan), record["val_elbo"], se,
                        "; rolled back, learning rate halved" if collapsed else "")
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
    _record_prior_check(trainer, state)
    return state, best_state
