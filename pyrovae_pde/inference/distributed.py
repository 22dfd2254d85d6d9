"""Data-parallel training and prediction on ``torch.distributed`` (``TrainConfig.distributed``,
``fit --distributed``, ``predict --distributed``).

Launched by ``torchrun`` (one process per rank; the process group is initialised from its
environment variables, ``env://``), every rank holds the same module and only its shard of the
subjects: of a set of N subjects (the training set, the validation set, a cohort to predict), rank
r of P holds the positions r, r + P, ... (``own_rows``; position j at row j // P), read lazily from
the cohort file (``data.cohort.LazyCohort``), so a rank's signal is 1/P of the cohort's. The random
numbers of a step are drawn on every rank from the same generator for the WHOLE global minibatch,
and each rank keeps its subjects' part, so a run on P ranks is the single-process run of the same
global batch up to the order of floating-point sums:

* minibatches: the same permutation on every rank (the epoch's seed); each rank takes its own
  subjects of each global minibatch (``owned``: about b / P of them, varying from batch to batch);
* gradients: each rank's loss is weighted by its share of the global batch (the wake ELBO's
  subsampling scale N / b_r and the distillation and sleep losses' means over b_r subjects then
  add up to the global batch's loss), and the gradients of the trainable parameters are summed
  by one ``all_reduce`` before the finiteness check, the gradient clipping and the optimizer
  step (``reduce_gradients``), so the parameters stay identical on every rank;
* per-subject work (the least-squares search, the Laplace refinements, the validation
  refinements and ELBO, predict's Laplace fits and particles): each rank does its own subjects
  and the results are all-gathered (or summed) before any global step (the EM of the population
  priors, the pooled noise); those cheap global steps then run identically on every rank;
* the guide's per-subject draws in the wake step and the validation ELBO (``SharedDraws``; a rank
  without subjects in a batch makes them too, ``skip_draws``), the sleep phase's simulated subjects
  (``sleep_loss_shard``) and predict's importance draws are drawn for the whole global batch on
  every rank and split, so the global RNG stays in step across ranks and with a single process.

Only rank 0 writes checkpoints, model files, posteriors and logs.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import pickle
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist
from pyro.distributions import Normal
from pyro.poutine.messenger import Messenger

__all__ = ["Share", "SharedDraws", "all_gather_objects", "broadcast_object", "gather_objects", "gather_rows",
           "init_from_env", "is_active", "own_rows", "owned", "process_group", "rank", "read_own", "reduce_gradients",
           "reduce_max", "skip_draws", "sleep_loss_shard", "sum_over_ranks", "together", "world_size"]

if TYPE_CHECKING:
    from ..data.cohort import CohortTensors, LazyCohort

T = TypeVar("T")


def is_active() -> bool:
    """Whether a process group is initialised (this process is one rank of a distributed run)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_active() else 0


def world_size() -> int:
    return dist.get_world_size() if is_active() else 1


def init_from_env(device: str, timeout_s: float, command: str = "fit") -> bool:
    """Join the process group described by torchrun's environment variables (``env://``); gloo on
    CPU, nccl on CUDA. Returns True if this call initialised it (False: it already was).
    ``command`` names the CLI command in the error raised outside torchrun."""
    if is_active():
        return False
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        from ..errors import InputError

        raise InputError(f"--distributed: the environment lacks {', '.join(missing)}; launch with "
                         f"'torchrun --nproc_per_node=P -m pyrovae_pde {command} ... --distributed'")
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend="nccl" if cuda else "gloo", init_method="env://",
                            timeout=datetime.timedelta(seconds=timeout_s))
    return True


@contextlib.contextmanager
def process_group(device: str, timeout_s: float, command: str = "fit", enabled: bool = True) -> Iterator[None]:
    """torchrun's process group for the block (``init_from_env``), left after it if the block joined
    it; ``enabled=False``: nothing (a single process)."""
    started = enabled and init_from_env(device, timeout_s, command)
    try:
        yield
    finally:
        if started:
            dist.destroy_process_group()


@dataclass(frozen=True)
class Share:
    """This rank's subjects of a set of ``n_total``: their positions ``rows`` (n,), ascending, on the CPU."""

    rows: torch.Tensor
    n_total: int

    @classmethod
    def of(cls, n_total: int) -> "Share":
        return cls(own_rows(n_total), n_total)

    def within(self, start: int, stop: int) -> slice:
        """The slice of this rank's subjects (rows of its data) whose positions are in [start, stop)."""
        lo, hi = torch.searchsorted(self.rows, torch.tensor([start, stop], dtype=self.rows.dtype)).tolist()
        return slice(lo, hi)


def read_own(cohort: LazyCohort) -> tuple[CohortTensors, Share]:
    """This rank's subjects (``own_rows``) of a ``LazyCohort``, read from it, and their ``Share``; a
    subject that breaks the contract stops every rank (``together``)."""
    from ..errors import InputError

    if cohort.n_subjects < world_size():
        raise InputError(f"{cohort.source}: {cohort.n_subjects} subjects for {world_size()} ranks; use at most "
                         f"{cohort.n_subjects} ranks")
    share = Share.of(cohort.n_subjects)
    return together(lambda: cohort.subset(share.rows)), share


def own_rows(n: int) -> torch.Tensor:
    """The positions (ascending) this rank holds of a set of ``n`` subjects: r, r + P, ... (all in one process)."""
    return torch.arange(rank(), n, world_size())


def owned(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's subjects of the global minibatch ``idx`` (positions in a set, position j held by
    rank j mod P at row j // P): (their positions in the set, their positions in idx)."""
    positions = torch.nonzero(idx % world_size() == rank()).flatten()
    return idx[positions], positions


def together(fn: Callable[[], T]) -> T:
    """``fn()`` on every rank; an exception on any rank is raised on every rank (the lowest such
    rank's; the failing rank raises its own), so that one rank's bad input, such as a subject whose
    signal breaks the contract, stops all of them at once instead of at a later collective's timeout."""
    try:
        result, error = fn(), None
    except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
        result, error = None, exc
    sent = error
    if error is not None:
        try:
            pickle.dumps(error)
        except Exception:  # noqa: BLE001 - an exception that does not pickle travels as its text
            sent = RuntimeError(f"rank {rank()}: {type(error).__name__}: {error}")
    first = next((e for e in all_gather_objects(sent) if e is not None), None)
    if error is not None:
        raise error
    if first is not None:
        raise first
    return result


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


def gather_objects(obj):
    """Every rank's ``obj`` on rank 0 (a list in rank order; None on the other ranks); tensors travel on the CPU."""
    out = [None] * world_size() if rank() == 0 else None
    dist.gather_object(_to(obj, "cpu"), out, dst=0)
    return out


def gather_rows(share: Share, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every rank's rows of ``tensors`` (each (n, ...): this rank's subjects ``share.rows``), joined
    in subject order on every rank: (n_total, ...) each, on the CPU."""
    parts = all_gather_objects((share.rows, *tensors))
    order = torch.cat([p[0] for p in parts]).argsort()
    return tuple(torch.cat([p[j] for p in parts])[order] for j in range(1, len(tensors) + 1))


def _collective_device() -> torch.device:
    """Where the tensors of a collective live: the rank's GPU with nccl, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """The sum of every rank's ``values`` (float64, on their device)."""
    total = values.to(_collective_device(), torch.float64).clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.to(values.device)


def reduce_max(value: float) -> float:
    """The largest of every rank's ``value``."""
    box = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return float(box)


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


def skip_draws(module, batch: int, dtype: torch.dtype) -> None:
    """In place of the guide of a global batch of ``batch`` subjects in which this rank has none:
    the guide's draws for the whole batch (the globals' and, as ``SharedDraws``, the subjects'),
    discarded, so that the global RNG stays in step with the ranks that have subjects. ``dtype``:
    the data's (the draws are made in it)."""
    from ..model.module import RefinedPosterior

    k, t, n = module.n_components, module.n_visits, module.domain.n_nodes
    device = module.noise_loc.device
    refined = RefinedPosterior(torch.zeros(1, k, 2, dtype=dtype, device=device),
                               torch.eye(2, dtype=dtype, device=device).expand(1, k, 2, 2))
    one = torch.zeros(1, dtype=torch.long, device=device)
    with torch.no_grad(), SharedDraws(one, batch):
        module.guide(torch.zeros(1, t, n, dtype=dtype, device=device), torch.zeros(1, t, dtype=dtype, device=device),
                     torch.ones(1, t, dtype=torch.bool, device=device), one, 1, refined=refined)


def sleep_loss_shard(module, u0: torch.Tensor, times: torch.Tensor, observed: torch.Tensor, noise,
                     positions: torch.Tensor, batch: int) -> torch.Tensor | None:
    """``MixturePDE.sleep_loss`` of a simulated batch of ``batch`` subjects restricted to its rows
    ``positions`` (u0 (b, n), times (b, T), observed (b, T): those rows' first scans and visits),
    weighted by their share of the batch: the draws are made for the whole batch (the same random
    numbers, in the same order, as ``simulate_prior``), the PDE is solved for these rows only.
    None when this rank has no rows."""
    k = module.n_components
    with torch.no_grad():
        log_d, log_r = module.draw_population(batch, u0.dtype, u0.device)
        n_nodes = u0.shape[-1]
        noise_eps = torch.randn(batch, k, times.shape[1] - 1, n_nodes, dtype=u0.dtype, device=u0.device)
        if len(positions) == 0:
            return None
        diffusivity = torch.exp(log_d[positions])
        reaction = torch.exp(log_r[positions]) if log_r is not None else None
        fields = module.simulate_fields(u0, times, diffusivity, reaction)  # (b, K, T, n)
        fields[:, :, 1:] += noise * noise_eps[positions]
        fields = fields * observed[:, None, :, None]
    b = len(positions)
    loss = module.sleep_nll(fields, times, observed, diffusivity, reaction)
    return loss * (b / batch)
