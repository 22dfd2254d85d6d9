"""Data-parallel training (``TrainConfig.distributed``, ``fit --distributed``): two CPU ranks (gloo on
loopback, started by torch.multiprocessing) reach the single-process fit of the same global batch and
seed; checkpoints record the world size and resume on another number of ranks."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from conftest import graph_mixture_module

from pyrovae_pde.data import cohort_tensors, domain_from_dataset, simulate
from pyrovae_pde.inference.train import TrainConfig, train

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")

QUICK = dict(progress=False, warmup_sleep_steps=50, distill_steps=50, seed=0, batch_size=16)
# Exact equality is not reachable: a rank sums its shard's terms and the all-reduce adds the shards, in
# another order than one process sums the whole batch (float32 gradients agree to ~5e-7 relative), and
# the Laplace refinement stops its iterations when no subject of its batch (the shard, not the global
# batch) still gains. The random numbers are the same (drawn for the whole global batch on every rank).
# Adam and the ~150 encoder steps amplify those last-bit differences in the encoder's weights (measured
# 1.3e-4 at most, weights up to 0.4), not in the globals (2e-7 noise, 5e-6 population priors), so:
TOL = {"encoder": dict(rtol=0, atol=1e-3), "globals": dict(rtol=1e-4, atol=1e-4)}
ELBO_RTOL = {"train_elbo": 1e-4, "val_elbo": 1e-4, "val_elbo_amortized": 1e-2}  # measured 2e-5, 2e-6, 1.3e-3


def _problem():
    ds = simulate("graph", 40, seed=3, noise_sd=0.02)
    domain = domain_from_dataset(ds)
    return ds, domain, cohort_tensors(ds, domain)




def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fit(rank: int, world: int, port: int, out: str, options: dict, checkpoint_dir: str | None, resume: bool,
         die_at_epoch: int | None = None) -> None:
    """One rank (world > 1: torchrun's environment on loopback) of a fit; rank 0 saves the result."""
    torch.set_num_threads(1)
    distributed = world > 1
    if distributed:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank))
    if die_at_epoch is not None and rank == 1:
        from pyrovae_pde.inference.trainer import Trainer

        original = Trainer.epoch

        def dying(self, epoch):
            if epoch == die_at_epoch:
                os._exit(1)
            return original(self, epoch)

        Trainer.epoch = dying
    ds, domain, data = _problem()
    module = graph_mixture_module(domain, ds)
    config = TrainConfig(distributed=distributed, distributed_timeout=30, **options)
    try:
        state = train(module, data, config, checkpoint_dir=checkpoint_dir, resume=resume)
    except Exception as exc:
        with open(f"{out}.rank{rank}.error", "w") as f:
            f.write(f"{type(exc).__name__}: {exc}")
        raise
    if rank == 0:
        torch.save({"module": module.state_dict(), "history": state.history}, out)


def _run(world: int, tmp_path, name: str, options: dict, checkpoint_dir=None, resume=False) -> dict:
    out = str(tmp_path / f"{name}.pt")
    args = (world, _free_port(), out, options, None if checkpoint_dir is None else str(checkpoint_dir), resume)
    if world == 1:
        _fit(0, *args)
    else:
        mp.spawn(_fit, args=args, nprocs=world, join=True)
    return torch.load(out, weights_only=False)


def _assert_same(a: dict, b: dict) -> None:
    for key, value in a["module"].items():
        if value.is_floating_point():
            tol = TOL["encoder" if key.startswith("encoder.") else "globals"]
            torch.testing.assert_close(b["module"][key], value, **tol, msg=lambda m, k=key: f"{k}: {m}")
    assert len(a["history"]) == len(b["history"])
    for ra, rb in zip(a["history"], b["history"]):
        for key, rtol in ELBO_RTOL.items():
            assert rb[key] == pytest.approx(ra[key], rel=rtol), (key, ra, rb)
        assert ra["skipped_steps"] == rb["skipped_steps"] and ra["steps"] == rb["steps"]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The reference: one process, 2 epochs, batches of 16 (36 training subjects: 16, 16, 4)."""
    return _run(1, tmp_path_factory.mktemp("single"), "single", dict(QUICK, epochs=2))


def test_two_ranks_equal_one_process(single, tmp_path):
    """2 ranks x 8 subjects per step (the last batch 2 x 2) equal one process with batches of 16:
    the parameters (encoder, noise, population priors, weights) and the ELBO history, to TOL; only
    rank 0 writes the checkpoint, which records the world size."""
    double = _run(2, tmp_path, "double", dict(QUICK, epochs=2), checkpoint_dir=tmp_path / "run2")
    _assert_same(single, double)
    assert torch.load(tmp_path / "run2" / "checkpoint.pt", weights_only=False)["world_size"] == 2


def test_resume_on_another_number_of_ranks(single, tmp_path):
    """2 ranks for 1 epoch, then resumed on 1 process for the second: the 2-epoch single run."""
    _run(2, tmp_path, "first", dict(QUICK, epochs=1), checkpoint_dir=tmp_path / "run")
    payload = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert payload["world_size"] == 2 and payload["state"]["epoch"] == 1
    resumed = _run(1, tmp_path, "resumed", dict(QUICK, epochs=2), checkpoint_dir=tmp_path / "run", resume=True)
    _assert_same(single, resumed)


def test_a_rank_that_dies_stops_the_job_and_the_checkpoint_resumes(single, tmp_path):
    """Rank 1 exits (os._exit(1)) at the start of epoch 2: rank 0 does not hang but fails at its next
    collective with an error (within the process group's 30 s timeout), the checkpoint of epoch 1 is
    intact, and resuming from it (on 1 process) finishes the 2-epoch fit."""
    out = str(tmp_path / "dead.pt")
    ctx = mp.spawn(_fit, args=(2, _free_port(), out, dict(QUICK, epochs=2), str(tmp_path / "run"), False, 1),
                   nprocs=2, join=False)
    for process in ctx.processes:
        process.join(timeout=120)
    assert [p.exitcode for p in ctx.processes] != [0, 0] and not any(p.is_alive() for p in ctx.processes)
    assert ctx.processes[1].exitcode == 1 and ctx.processes[0].exitcode != 0
    error = (tmp_path / "dead.pt.rank0.error").read_text()
    assert error  # gloo: the peer closed the connection, or the collective timed out
    payload = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert payload["state"]["epoch"] == 1 and payload["world_size"] == 2
    resumed = _run(1, tmp_path, "resumed", dict(QUICK, epochs=2), checkpoint_dir=tmp_path / "run", resume=True)
    _assert_same(single, resumed)
