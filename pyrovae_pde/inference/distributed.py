"""Data-parallel training on ``torch.distributed`` (``TrainConfig.distributed``, ``fit --distributed``).

Launched by ``torchrun`` (one process per rank; the process group is initialised from its
environment variables, ``env://``), every rank holds the whole cohort and the same module. The
random numbers of a step are drawn on every rank from the same generator for the WHOLE global
minibatch, and each rank keeps its shard's part, so a run on P ranks is the single-process run
of the same global batch up to the order of floating-point sums:

* minibatches: the same permutation on every rank (the epoch's seed); rank r takes every P-th
  subject of each global minibatch (``shard``);
* gradients: each rank's loss is weighted by its share of the global batch (the wake ELBO's
  subsampling scale N / b_r and the distillation and sleep losses' means over b_r subjects then
  add up to the global batch's loss), and the gradients of the trainable parameters are summed
  by one ``all_reduce`` before the finiteness check, the gradient clipping and the optimizer
  step (``reduce_gradients``), so the parameters stay identical on every rank;
* per-subject work (the least-squares search, the Laplace refinements, the validation
  refinements): each rank does its shard and the results are all-gathered before any global
  step (the EM of the population priors, the pooled noise); those cheap global steps then run
  identically on every rank;
* the guide's per-subject draws in the wake step (``SharedDraws``) and the sleep phase's
  simulated subjects (``sleep_loss_shard``) are drawn for the whole global batch on every rank
  and split, so the global RNG stays in step across ranks and with a single process.

Only rank 0 writes checkpoints, model files and logs.
"""
from __future__ import annotations

import datetime
import os

import pyro
import torch
import torch.distributed as dist
from pyro.distributions import Normal
from pyro.poutine.messenger import Messenger

__all__ = ["SharedDraws", "all_gather_objects", "broadcast_object", "init_from_env", "is_active", "rank",
           "reduce_gradients", "shard", "sleep_loss_shard", "world_size"]


def is_active() -> bool:
    """Whether a process group is initialised (this process is one rank of a distributed run)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_active() else 0


def world_size() -> int:
    return dist.get_world_size() if is_active() else 1


def init_from_env(device: str, timeout_s: float) -> bool:
    """Join the process group described by torchrun's environment variables (``env://``); gloo on
    CPU, nccl on CUDA. Returns True if this call initialised it (False: it already was)."""
    if is_active():
        return False
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        from ..errors import InputError

        raise InputError(f"--distributed: the environment lacks {', '.join(missing)}; launch with "
                         "'torchrun --nproc_per_node=P -m pyrovae_pde fit ... --distributed'")
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend="nccl" if cuda else "gloo", init_method="env://",
                            timeout=datetime.timedelta(seconds=timeout_s))
    return True


def shard(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's subjects of the global minibatch ``idx``: (their indices, their positions in idx)."""
    positions = torch.arange(rank(), len(idx), world_size(), device=idx.device)
    return idx[positions], positions


def reduce_gradients(params: list[torch.Tensor], loss_value: float, finite: bool) -> float:
    """Sum the gradients of ``params`` and the (share-weighted) loss over the ranks, in place; a rank
    whose loss was not finite makes the sum NaN, so every rank skips the step together. Parameters
    without a gradient on every rank keep none (as Adam expects). Returns the summed loss."""
    device, f64 = params[0].device, torch.float64  # summed in double: the sum of two float32 is exact there
    parts = [p.grad.reshape(-1).to(f64) if p.grad is not None else torch.zeros(p.numel(), dtype=f64, device=device)
             for p in params]
    has = torch.tensor([float(p.grad is not None) for p in params], dtype=f64, device=device)
    flat = torch.cat(parts + [has, torch.tensor([loss_value if finite else float("nan")], dtype=f64,
                                                device=device)])
    if not finite:
        flat[:-len(params) - 1] = float("nan")
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p, flag in zip(params, flat[-len(params) - 1:-1].tolist()):
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype) if flag > 0 else None
        offset += n
    return float(flat[-1])


def all_gather_objects(obj):
    """Every rank's ``obj`` (a list in rank order); tensors travel on the CPU."""
    out = [None] * world_size()
    dist.all_gather_object(out, _to(obj, "cpu"))
    return out


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank."""
    box = [_to(obj, "cpu") if rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(o, device) for o in obj)
    return obj


class SharedDraws(Messenger):
    """The guide's per-subject draws (sites ``diffusivity`` and ``reaction``, LogNormal with the
    subject in the last batch dimension) made for the whole global batch of ``batch`` subjects from
    the global RNG, as ``Normal.rsample`` would, keeping the columns ``positions`` of this rank's
    subjects: every rank consumes the same random numbers, and a single process (positions =
    all) draws exactly what it draws without this handler."""

    SITES = ("diffusivity", "reaction")

    def __init__(self, positions: torch.Tensor, batch: int):
        super().__init__()
        self.positions, self.batch = positions, batch

    def _pyro_sample(self, msg):
        if msg["name"] not in self.SITES or msg["is_observed"] or msg["value"] is not None:
            return
        fn = msg["fn"]
        base = fn.base_dist
        while not isinstance(base, Normal) and hasattr(base, "base_dist"):
            base = base.base_dist
        loc, scale = base.loc, base.scale
        shape = tuple(fn.batch_shape[:-1]) + (self.batch,)
        eps = torch.empty(shape, dtype=loc.dtype, device=loc.device).normal_()
        msg["value"] = (loc + eps[..., self.positions.to(loc.device)] * scale).exp()


def sleep_loss_shard(module, u0: torch.Tensor, times: torch.Tensor, observed: torch.Tensor, noise,
                     positions: torch.Tensor) -> torch.Tensor | None:
    """``MixturePDE.sleep_loss`` of the simulated batch (u0, times, observed: the WHOLE sleep batch)
    restricted to the rows ``positions``, weighted by their share of the batch: the draws are made
    for the whole batch (the same random numbers, in the same order, as ``simulate_prior``), the
    PDE is solved for this rank's rows only. None when this rank has no rows."""
    batch = u0.shape[0]
    k = module.n_components
    loc, scale = module.population_loc.to(u0), module.population_scale.to(u0)
    ri = module.rate_index
    with torch.no_grad():
        d_eps = torch.randn(batch, k, dtype=u0.dtype, device=u0.device)
        r_eps = torch.randn(batch, len(ri), dtype=u0.dtype, device=u0.device) if ri else None
        n_nodes = u0.shape[-1]
        noise_eps = torch.randn(batch, k, times.shape[1] - 1, n_nodes, dtype=u0.dtype, device=u0.device)
        if len(positions) == 0:
            return None
        diffusivity = torch.exp(loc[:, 0] + scale[:, 0] * d_eps[positions])
        reaction = torch.exp(loc[ri, 1] + scale[ri, 1] * r_eps[positions]) if ri else None
        fields = module.predict(u0[positions], times[positions], diffusivity, reaction)  # (b, K, T, n)
        fields[:, :, 1:] += noise * noise_eps[positions]
        fields = fields * observed[positions][:, None, :, None]
    own_times, own_observed = times[positions], observed[positions]
    b = len(positions)
    flat = fields.reshape(b * k, *fields.shape[2:])
    d_loc, d_scale, r_loc, r_scale = module.encode(flat, own_times.repeat_interleave(k, 0),
                                                   own_observed.repeat_interleave(k, 0))
    own = torch.arange(k, device=u0.device).repeat(b)
    rows = torch.arange(b * k, device=u0.device)
    log_q = pyro.distributions.Normal(d_loc[rows, own], d_scale[rows, own]).log_prob(diffusivity.log().reshape(-1))
    loss = -log_q.mean()
    if reaction is not None:
        rate_rows = [i for i in range(b * k) if int(own[i]) in ri]
        rate_col = torch.tensor([ri.index(int(own[i])) for i in rate_rows], device=u0.device)
        rate_rows = torch.tensor(rate_rows, device=u0.device)
        truth = reaction.log()[rate_rows // k, rate_col]
        loss = loss - pyro.distributions.Normal(r_loc[rate_rows, rate_col],
                                                r_scale[rate_rows, rate_col]).log_prob(truth).mean()
    return loss * (b / batch)
