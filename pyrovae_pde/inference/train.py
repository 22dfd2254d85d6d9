"""Training: SVI with TraceEnum_ELBO, minibatches by plate subsampling, early stopping on a
held-out split, atomic checkpoints and resume."""
from __future__ import annotations

import copy
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyro
import torch
from pyro.infer import SVI, TraceEnum_ELBO
from tqdm.auto import tqdm

from ..data.cohort import CohortTensors
from ..model.module import MAX_PLATE_NESTING, MixturePDE

CHECKPOINT_NAME = "checkpoint.pt"


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last good state was kept."""


@dataclass
class TrainConfig:
    """Settings of a fit. ``learning_rate`` decays geometrically to ``final_lr_fraction`` of itself."""

    epochs: int = 150
    batch_size: int = 64
    learning_rate: float = 3e-3
    final_lr_fraction: float = 0.05
    validation_fraction: float = 0.1
    patience: int = 25
    seed: int = 0
    device: str = "cpu"
    clip_norm: float = 20.0
    warmup_sleep_steps: int = 400
    sleep_batch_size: int = 32
    sleep_every: int = 1
    progress: bool = True


@dataclass
class TrainState:
    """What a checkpoint holds besides the module and optimizer state."""

    epoch: int = 0
    history: list = field(default_factory=list)
    best_val: float = math.inf
    best_epoch: int = -1
    stopped_early: bool = False


def split_indices(n: int, validation_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Reproducible train/validation split of n subjects (no validation set below 10 subjects)."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * validation_fraction)) if n >= 10 else 0
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _elbo() -> TraceEnum_ELBO:
    return TraceEnum_ELBO(max_plate_nesting=MAX_PLATE_NESTING)


def evaluate_loss(module: MixturePDE, data: CohortTensors, batch_size: int = 256) -> float:
    """Negative ELBO per subject of ``data`` (one guide draw per subject), no parameter update."""
    elbo = _elbo()
    total = 0.0
    n = data.n_subjects
    with torch.no_grad():
        for start in range(0, n, batch_size):
            idx = torch.arange(start, min(start + batch_size, n))
            args = (data.signal[idx], data.times[idx], data.observed[idx], idx.to(data.signal.device), n)
            total += elbo.loss(module.model, module.guide, *args) * len(idx) / n
    return total / n


def _save_checkpoint(path: Path, module: MixturePDE, optimizer, sleep_optimizer, state: TrainState,
                     best_state: dict, config: TrainConfig) -> None:
    from ..data.contract import atomic_write

    payload = {"module": module.state_dict(), "optimizer": optimizer.get_state(), "state": asdict(state),
               "sleep_optimizer": sleep_optimizer.state_dict(),
               "best_module": best_state, "config": asdict(config), "torch_rng": torch.get_rng_state()}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def train(module: MixturePDE, data: CohortTensors, config: TrainConfig = TrainConfig(),
          checkpoint_dir: str | os.PathLike | None = None, resume: bool = False) -> TrainState:
    """Fit ``module`` to ``data`` by SVI; returns the training state (history, best epoch).

    The module ends with the parameters of the best validation epoch (or the last epoch when
    there is no validation split). With ``checkpoint_dir``, a checkpoint is written atomically
    after every epoch and ``resume=True`` continues from it.
    """
    device = torch.device(config.device)
    module.to(device)
    data = data.to(device)
    train_idx, val_idx = split_indices(data.n_subjects, config.validation_fraction, config.seed)
    train_data, val_data = data.subset(train_idx), data.subset(val_idx)
    n_train = train_data.n_subjects
    steps_per_epoch = max(1, math.ceil(n_train / config.batch_size))
    lrd = config.final_lr_fraction ** (1.0 / max(1, config.epochs * steps_per_epoch))
    optimizer = pyro.optim.ClippedAdam({"lr": config.learning_rate, "lrd": lrd, "clip_norm": config.clip_norm})
    state = TrainState()
    best_state = copy.deepcopy(module.state_dict())
    checkpoint = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir else None

    pyro.clear_param_store()
    pyro.set_rng_seed(config.seed)
    if resume:
        if checkpoint is None or not checkpoint.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {checkpoint}; start without --resume")
        payload = torch.load(checkpoint, map_location=device, weights_only=False)
        module.load_state_dict(payload["module"])
        state = TrainState(**payload["state"])
        best_state = payload["best_module"]
        torch.set_rng_state(payload["torch_rng"])
    svi = SVI(module.model, module.guide, optimizer, loss=_elbo())
    if resume:
        optimizer.set_state(payload["optimizer"])  # applied as each parameter is first seen

    sleep_optimizer = torch.optim.Adam(module.encoder.parameters(), lr=config.learning_rate)
    if resume and payload.get("sleep_optimizer"):
        sleep_optimizer.load_state_dict(payload["sleep_optimizer"])
    generator = torch.Generator().manual_seed(config.seed)

    def sleep_step() -> float:
        pick = torch.randint(n_train, (config.sleep_batch_size,), generator=generator).to(device)
        noise = torch.exp(module.noise_loc.detach())
        loss = module.sleep_loss(train_data.signal[pick, 0], train_data.times[pick], train_data.observed[pick], noise)
        sleep_optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.encoder.parameters(), config.clip_norm)
        sleep_optimizer.step()
        return loss.item()

    if state.epoch == 0 and config.warmup_sleep_steps:
        warm = tqdm(range(config.warmup_sleep_steps), desc="warm-up (simulated subjects)", unit="step",
                    disable=not config.progress, leave=False)
        for _ in warm:
            warm.set_postfix({"-log q": f"{sleep_step():.3f}"})
        warm.close()

    bar = tqdm(range(state.epoch, config.epochs), desc="fit", unit="epoch", disable=not config.progress,
               initial=state.epoch, total=config.epochs)
    for epoch in bar:
        generator.manual_seed(config.seed + 7919 * (epoch + 1))  # per epoch, so resuming repeats it exactly
        perm = torch.randperm(n_train, generator=generator)
        epoch_loss = 0.0
        for start in range(0, n_train, config.batch_size):
            idx = perm[start:start + config.batch_size].to(device)
            try:
                loss = svi.step(train_data.signal[idx], train_data.times[idx], train_data.observed[idx], idx, n_train)
            except ValueError as exc:  # Pyro's validation of a distribution that received NaN/inf
                if "invalid values" not in str(exc):
                    raise
                loss = math.nan
            if not math.isfinite(loss):
                module.load_state_dict(best_state)
                where = f"; the last good checkpoint is kept at {checkpoint}" if checkpoint else ""
                raise TrainingDivergedError(
                    f"the ELBO became {loss} at epoch {epoch}; training stopped{where}. Lower the learning "
                    "rate (--lr) or check the data for extreme values")
            epoch_loss += loss / steps_per_epoch
            if config.sleep_every and (start // config.batch_size) % config.sleep_every == 0:
                sleep_step()
        record = {"epoch": epoch, "train_elbo": -epoch_loss / n_train}
        if val_data.n_subjects:
            val_loss = evaluate_loss(module, val_data)
            record["val_elbo"] = -val_loss
            improved = val_loss < state.best_val
        else:
            val_loss, improved = -record["train_elbo"], True
        if improved:
            state.best_val, state.best_epoch = val_loss, epoch
            best_state = copy.deepcopy(module.state_dict())
        state.history.append(record)
        state.epoch = epoch + 1
        bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k != "epoch"})
        if checkpoint is not None:
            _save_checkpoint(checkpoint, module, optimizer, sleep_optimizer, state, best_state, config)
        if val_data.n_subjects and epoch - state.best_epoch >= config.patience:
            state.stopped_early = True
            break
    bar.close()
    # The checkpoint keeps the last epoch's state (what --resume continues from); the module
    # returned holds the best held-out epoch's parameters.
    module.load_state_dict(best_state)
    return state
