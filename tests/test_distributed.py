"""Data-parallel training and prediction (``fit --distributed``, ``predict --distributed``): two CPU
ranks (gloo on loopback, started by torch.multiprocessing), each reading only its own subjects from
the cohort file, reach the single-process fit of the same global batch and seed and write the
single-process posterior; checkpoints record the world size and resume on another number of ranks."""
from __future__ import annotations

import functools
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import xarray as xr
from conftest import graph_mixture_module

from pyrovae_pde.data import LazyCohort, cohort_tensors, domain_from_dataset, load_dataset, save_dataset, simulate
from pyrovae_pde.inference.train import TrainConfig, train

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")

# amortize_steps=0: distributed fits are not amortized, so neither is the one-process reference
QUICK = dict(progress=False, warmup_sleep_steps=50, distill_steps=50, seed=0, batch_size=16, amortize_steps=0)
# Exact equality is not reachable: a rank sums its subjects' terms and the all-reduce adds the ranks', in
# another order than one process sums the whole batch (float32 gradients agree to ~5e-7 relative), its
# float32 solves run on batches of other sizes (products rounded differently), and the Laplace
# refinement stops its iterations when no subject of its batch (the rank's part, not the global batch)
# still gains. The random numbers are the same (drawn for the whole global batch on every rank). Adam
# and the ~150 encoder steps amplify those last-bit differences in the encoder's weights (measured
# 1.2e-4 at most with Gaussian populations, 1.0e-3 on 1 of 65,536 weights with mixture populations, whose
# guide moves with each term's responsibilities; weights up to 0.4), not in the globals (0 noise and
# weights, 4e-6 population priors), so:
ENCODER_RELATIVE_TOL = 0.02  # ||difference|| / ||weights|| per encoder tensor (see _assert_same)
GLOBALS_TOL = dict(rtol=1e-4, atol=1e-4)
# measured 6e-6, 2e-6 and 4.3e-3 (one step count per subject) / 2.3e-2 (per component): the amortized
# validation ELBO reads the encoder, whose weights drift apart by roundoff (see _assert_same)
ELBO_RTOL = {"train_elbo": 1e-4, "val_elbo": 1e-4, "val_elbo_amortized": 5e-2}


def _problem():
    ds = simulate("graph", 40, seed=3, noise_sd=0.02)
    domain = domain_from_dataset(ds)
    return ds, domain, cohort_tensors(ds, domain)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, world: int, port: int) -> None:
    """torchrun's environment of ``rank`` of ``world`` on loopback, one thread per rank."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))


def _record_reads(log: str) -> None:
    """Save every ``LazyCohort.subset`` call of this process to ``log``: the subjects asked for and the
    shape of the signal read (what this rank holds)."""
    reads, original = [], LazyCohort.subset

    def subset(self, index):
        data = original(self, index)
        reads.append((list(data.subjects), tuple(data.signal.shape), self.read_subjects))
        torch.save(reads, log)
        return data

    LazyCohort.subset = subset


def _fit(rank: int, world: int, port: int, out: str, options: dict, checkpoint_dir: str | None, resume: bool,
         die_at_epoch: int | None = None, cohort_file: str | None = None) -> None:
    """One rank (world > 1: torchrun's environment on loopback) of a fit; rank 0 saves the result.
    ``cohort_file``: the ranks read their subjects lazily from it (else each holds the whole cohort)."""
    torch.set_num_threads(1)
    distributed = world > 1
    if distributed:
        _join(rank, world, port)
    if die_at_epoch is not None and rank == 1:
        from pyrovae_pde.inference.trainer import Trainer

        original = Trainer.epoch

        def dying(self, epoch):
            if epoch == die_at_epoch:
                os._exit(1)
            return original(self, epoch)

        Trainer.epoch = dying
    ds, domain, data = _problem()
    if cohort_file is not None:
        _record_reads(f"{out}.rank{rank}.reads")
        data = LazyCohort(load_dataset(cohort_file, lazy=True), domain)
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


def _run(world: int, tmp_path, name: str, options: dict, checkpoint_dir=None, resume=False, cohort_file=None) -> dict:
    out = str(tmp_path / f"{name}.pt")
    args = (world, _free_port(), out, options, None if checkpoint_dir is None else str(checkpoint_dir), resume,
            None, cohort_file)
    if world == 1:
        _fit(0, *args)
    else:
        mp.spawn(_fit, args=args, nprocs=world, join=True)
    return torch.load(out, weights_only=False)


def _assert_same(a: dict, b: dict) -> None:
    for key, value in a["module"].items():
        if not value.is_floating_point():
            continue
        if key.startswith("encoder."):
            # Roundoff (batch shapes differ between one process and two ranks) grows through Adam's
            # normalised steps: measured relative differences up to 0.17% per tensor (1e-3 on the
            # worst weight) with one step count per subject, 0.63% (4e-3) with one per component.
            # A missing or wrong reduction also shows in the globals and ELBOs, held to 1e-4.
            change = float((b["module"][key] - value).norm() / value.norm().clamp_min(1e-12))
            assert change <= ENCODER_RELATIVE_TOL, (key, change)
            torch.testing.assert_close(b["module"][key], value, rtol=0, atol=1e-2, msg=lambda m, k=key: f"{k}: {m}")
        else:
            torch.testing.assert_close(b["module"][key], value, **GLOBALS_TOL, msg=lambda m, k=key: f"{k}: {m}")
    assert len(a["history"]) == len(b["history"])
    for ra, rb in zip(a["history"], b["history"]):
        for key, rtol in ELBO_RTOL.items():
            assert rb[key] == pytest.approx(ra[key], rel=rtol), (key, ra, rb)
        assert ra["skipped_steps"] == rb["skipped_steps"] and ra["steps"] == rb["steps"]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The reference: one process, 2 epochs, batches of 16 (36 training subjects: 16, 16, 4)."""
    return _run(1, tmp_path_factory.mktemp("single"), "single", dict(QUICK, epochs=2))


def test_two_ranks_reading_their_shards_equal_one_process(single, tmp_path):
    """2 ranks, each reading from the cohort file only the subjects it holds (every other one of the
    36 training and of the 4 validation subjects: 20 subjects, 20 x 5 x 68 signal values), take
    their own subjects of each global batch of 16 and equal one process holding the whole cohort:
    the parameters (encoder, noise, population priors, weights) and the ELBO history, to the
    tolerances of _assert_same; only rank 0 writes the checkpoint, which records the world size."""
    cohort = tmp_path / "cohort.nc"
    save_dataset(_problem()[0], cohort)
    double = _run(2, tmp_path, "double", dict(QUICK, epochs=2), checkpoint_dir=tmp_path / "run2",
                  cohort_file=str(cohort))
    _assert_same(single, double)
    assert torch.load(tmp_path / "run2" / "checkpoint.pt", weights_only=False)["world_size"] == 2
    held = []
    for rank in (0, 1):
        reads = torch.load(tmp_path / f"double.pt.rank{rank}.reads", weights_only=False)
        assert [shape for _, shape, _ in reads] == [(18, 5, 68), (2, 5, 68)]  # training, validation; read once
        assert reads[-1][2] == 20  # LazyCohort.read_subjects
        held.append({s for subjects, _, _ in reads for s in subjects})
    assert len(held[0]) == len(held[1]) == 20 and not held[0] & held[1]
    assert held[0] | held[1] == set(_problem()[0]["subject"].values.tolist())


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


@pytest.mark.parametrize("semi", [True, False])
def test_a_rank_without_subjects_in_a_batch_draws_what_the_others_draw(graph_ds, semi):
    """``skip_draws`` consumes the global RNG exactly as the guide of a batch of 5 does on a rank
    holding 2 of its subjects (``SharedDraws``), under the semi-amortized and the amortized guide, so
    a rank that has none of a batch's subjects stays in step with the others (and with one process)."""
    from pyrovae_pde.inference.distributed import SharedDraws, skip_draws
    from pyrovae_pde.inference.objective import trace_elbo
    from pyrovae_pde.model.module import RefinedPosterior

    domain = domain_from_dataset(graph_ds)
    module, data = graph_mixture_module(domain, graph_ds), cohort_tensors(graph_ds, domain)
    idx, k = torch.tensor([1, 3]), module.n_components
    refined = RefinedPosterior(torch.full((2, k, 2), -1.0), 0.1 * torch.eye(2).expand(2, k, 2, 2)) if semi else None
    torch.manual_seed(7)
    with SharedDraws(idx, 5):
        trace_elbo().differentiable_loss(module.model, module.guide, data.signal[idx], data.times[idx],
                                         data.observed[idx], idx, 5, refined=refined)
    after = torch.rand(4)
    torch.manual_seed(7)
    skip_draws(module, 5, data.signal.dtype)
    assert torch.equal(torch.rand(4), after)
    torch.manual_seed(7)
    skip_draws(module, 6, data.signal.dtype)  # the check can fail: another batch size draws other numbers
    assert not torch.equal(torch.rand(4), after)


def _validation_elbos(ds, share=None) -> list[float]:
    """evaluate_elbo (value, MC error) of the cohort ``ds`` (of this rank's ``share`` of it) under a
    refined and the amortized guide, in batches of 1 (a rank has none of every other batch) and of 256."""
    from pyrovae_pde.inference.objective import evaluate_elbo
    from pyrovae_pde.model.module import RefinedPosterior

    domain = domain_from_dataset(ds)
    module, data = graph_mixture_module(domain, ds), cohort_tensors(ds, domain)
    k = module.n_components
    loc = -1.0 + 0.3 * torch.randn(data.n_subjects, k, 2, generator=torch.Generator().manual_seed(1))
    refined = RefinedPosterior(loc, 0.05 * torch.eye(2).expand(data.n_subjects, k, 2, 2))
    if share is not None:
        data, refined = data.subset(share.rows), RefinedPosterior(refined.loc[share.rows], refined.cov[share.rows])
    return [value for guide in (refined, None) for size in (1, 256)
            for value in evaluate_elbo(module, data, guide, n_draws=3, seed=5, batch_size=size, share=share)]


def _validation_rank(rank: int, world: int, port: int, out: str) -> None:
    from pyrovae_pde.inference import distributed as ddp

    _join(rank, world, port)
    ds = simulate("graph", 13, seed=6, noise_sd=0.02)
    with ddp.process_group("cpu", 30):
        values = _validation_elbos(ds, ddp.Share.of(ds.sizes["subject"]))
    if rank == 0:
        torch.save(values, out)


def test_the_sharded_validation_elbo_is_one_process_elbo(tmp_path):
    """The validation ELBO of 13 subjects evaluated by 2 ranks, each on its own subjects (with the
    whole batches' draws, summed over the ranks), is one process's value and MC error (about 290 and
    4-15 nats per subject) to float32 rounding (1e-4 nats), under the refined and the amortized
    guide, in batches of 256 and of 1 (where a rank has none of every other batch and makes its
    draws with ``skip_draws``); draws out of step would differ by the MC error."""
    out = tmp_path / "elbos.pt"
    mp.spawn(_validation_rank, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    single = _validation_elbos(simulate("graph", 13, seed=6, noise_sd=0.02))
    assert torch.load(out, weights_only=False) == pytest.approx(single, rel=0, abs=1e-4)


def _read_own_rank(rank: int, world: int, port: int, path: str) -> None:
    """Read this rank's subjects of ``path``; save the error it raises, if any."""
    from pyrovae_pde.errors import ContractError
    from pyrovae_pde.inference import distributed as ddp

    _join(rank, world, port)
    ds = load_dataset(path, lazy=True)
    with ddp.process_group("cpu", 30):
        try:
            ddp.read_own(LazyCohort(ds, domain_from_dataset(ds), source=path))
        except ContractError as exc:
            with open(f"{path}.rank{rank}", "w") as f:
                f.write(str(exc))


def test_a_bad_subject_read_by_one_rank_stops_every_rank_with_its_message(graph_ds, tmp_path):
    """Subject 3's signal breaks the contract; rank 1 reads it (subjects 1, 3), rank 0 does not (0, 2,
    4): both ranks raise the same one-line ContractError naming it, at once (no collective timeout)."""
    values = graph_ds["signal"].values.copy()
    values[3, 0, 5] = float("nan")
    path = tmp_path / "bad.nc"
    graph_ds.assign(signal=(graph_ds["signal"].dims, values)).to_netcdf(path, engine="h5netcdf")
    mp.spawn(_read_own_rank, args=(2, _free_port(), str(path)), nprocs=2, join=True)
    messages = [(tmp_path / f"bad.nc.rank{rank}").read_text() for rank in (0, 1)]
    assert messages[0] == messages[1] and "subject 'sub-0003', visit 0" in messages[0]


def _small_laplace_batches(batch_size: int = 2) -> None:
    """predict's Laplace fits in batches of ``batch_size`` subjects (default: all at once), so that
    the ranks share batches whose iterations must stop together and rank 1 has none of the last."""
    from pyrovae_pde.inference import laplace, posterior

    posterior.laplace_fit = functools.partial(laplace.laplace_fit, batch_size=batch_size)


def _predict(rank: int, world: int, port: int, argv: list[str], log: str) -> None:
    """One rank of 'torchrun ... -m pyrovae_pde predict ... --distributed'; records what it reads."""
    from pyrovae_pde.interfaces.cli import main

    _join(rank, world, port)
    _record_reads(f"{log}.rank{rank}")
    _small_laplace_batches()
    code = main(argv)
    if code:
        raise SystemExit(code)


# Sharded predict makes one process's random numbers, batches of Laplace searches (stopping together)
# and pooled noise, but its float32 solves run on batches of other sizes, whose products round
# differently (measured: 1.8e-7 in a field); the float32 Levenberg-Marquardt search carries that to
# ~1e-5 relative in the modes and 3.6e-4 in the particles' interpolated 90% bounds (measured maxima
# here; on 500 subjects a few importance-sampled values differ by up to 5%, as much as one process's
# do when its Laplace batches are split differently: see README).
PREDICT_TOL = dict(rtol=2e-3, atol=1e-8)


def test_sharded_predict_writes_the_single_process_posterior(single, tmp_path, monkeypatch, capsys):
    """'predict --distributed' on 2 ranks, 15 subjects (rank 0 reads subjects 0, 2, ..., 14, rank 1
    the 7 others, once), 128 importance particles each and Laplace batches of 2 subjects: rank 0
    alone writes the posterior file, the one process's to PREDICT_TOL (subjects, attributes and the
    prior-data conflict verdicts exactly); without torchrun it is a one-line error."""
    from pyrovae_pde.inference import posterior
    from pyrovae_pde.interfaces.api import SubtypeModel
    from pyrovae_pde.interfaces.cli import main

    ds, domain, _ = _problem()
    module = graph_mixture_module(domain, ds)
    module.load_state_dict(single["module"])
    model = SubtypeModel(module.components, priors=module.priors)
    model.domain_, model.priors, model.time_scale_, model.module_ = domain, module.priors, module.time_scale, module
    model.save(tmp_path / "run")
    cohort = tmp_path / "new.nc"
    save_dataset(simulate("graph", 15, seed=4, noise_sd=0.02), cohort)
    argv = ["predict", str(tmp_path / "run"), str(cohort), "--seed", "3", "--out"]

    monkeypatch.setattr(posterior, "laplace_fit", functools.partial(posterior.laplace_fit, batch_size=2))
    assert main(argv + [str(tmp_path / "one.nc")]) == 0
    out = tmp_path / "out" / "sharded.nc"
    mp.spawn(_predict, args=(2, _free_port(), argv + [str(out), "--distributed"], str(tmp_path / "reads")),
             nprocs=2, join=True)
    one, sharded = xr.load_dataset(tmp_path / "one.nc"), xr.load_dataset(out)
    assert sharded.attrs["n_particles"] == 128 and sharded.sizes["subject"] == 15
    xr.testing.assert_allclose(sharded, one, **PREDICT_TOL)
    assert (sharded["subject"].values == one["subject"].values).all()
    conflict = [json.loads(d.attrs.pop("prior_conflict")) for d in (sharded, one)]
    assert sharded.attrs == one.attrs
    for a, b in zip(*conflict):
        assert a["conflict"] == b["conflict"] and a["n_subjects"] == b["n_subjects"]
        assert a["suggested"] == pytest.approx(b["suggested"], rel=PREDICT_TOL["rtol"])
    assert os.listdir(out.parent) == ["sharded.nc"]  # one file, written once (atomically) by rank 0
    subjects = [str(s) for s in one["subject"].values]
    for rank, shape in ((0, (8, 5, 68)), (1, (7, 5, 68))):
        reads = torch.load(tmp_path / f"reads.rank{rank}", weights_only=False)
        assert reads == [(subjects[rank::2], shape, shape[0])]

    capsys.readouterr()
    assert main(argv + [str(tmp_path / "x.nc"), "--distributed"]) == 2
    err = capsys.readouterr().err
    assert "lacks RANK" in err and "torchrun --nproc_per_node=P -m pyrovae_pde predict" in err
    assert not (tmp_path / "x.nc").exists()
