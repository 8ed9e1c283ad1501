"""A sweep trial on several ranks (--workers N > 1): N Ray actors in the bundles of the trial's own placement group,
each a rank of one DeepSpeed process group running sweep_trial.TrialRun in step with the others.

Why not a Ray Train TorchTrainer inside the trial, as sweep.py used before: Ray Train V2 runs a controller actor that
reserves a placement group of its own, which Tune neither counts nor releases. Tune stops a trial (ASHA, or the
report that ends its budget) by killing its actor, and the controller with it, before the controller has shut its
worker group down; that placement group lives on with the driver's job (Ray's PlacementGroupCleaner, meant to
remove it, needs the state API, i.e. a dashboard, and otherwise logs "Failed to query Ray Train Controller actor
state" for ever). Each stopped trial kept its workers' CPUs, and the next trial's worker group timed out at
start-up and retried without end (ray-project/ray#54305). Here Tune reserves a trial's ranks with the trial
(`trial_resources`: the trial's own 0.01 CPU, then one bundle per rank), so it starts only as many trials as the
cluster holds, and stopping a trial removes its placement group and every rank in it. A rank that dies fails the
trial, which Tune restarts from its last reported checkpoint (--max-failures), as it does a one-process trial;
ranks that do not start within START_TIMEOUT_S fail it the same way, with the reason.

This module travels to Ray's workers by value (ray_common.start_ray).
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import ray_common as common
from sweep_trial import SweepSetup, TrialRun

DRIVER_CPU = 0.01  # the trial's own actor only drives its ranks (Ray refuses a bundle of 0 CPU)
START_TIMEOUT_S = 600  # the ranks' start, rendezvous and restore; a first DeepSpeed run builds its comm op (~1 min)


def trial_resources(shape: common.WorkerShape):
    """What Tune reserves for one trial: the trial's actor, then one bundle per rank (packed on as few nodes as
    fit them)."""
    from ray import tune

    rank = {"CPU": shape.cpus_per_worker, **({"GPU": shape.gpus_per_worker} if shape.gpus_per_worker else {})}
    return tune.PlacementGroupFactory([{"CPU": DRIVER_CPU}] + [rank] * shape.workers, strategy="PACK")


def trial_cpus(shape: common.WorkerShape) -> float:
    """Logical CPUs one trial holds, its driving actor included."""
    return shape.workers * shape.cpus_per_worker + (DRIVER_CPU if shape.workers > 1 else 0)


class Rank:
    """One rank of a trial (a Ray actor): its process group and its part of the trial."""

    def address(self) -> tuple[str, str, int]:
        """(node id, IP, a free port): where rank 0 listens for the others."""
        import ray

        from ddaebm.distributed import free_port

        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address(), free_port()

    def begin(self, setup: SweepSetup, params: dict, trial_id: str, rank: int, world: int, local_rank: int,
              master: tuple[str, int], checkpoint) -> int:
        """Join the trial's process group (as a launcher's rank would: RANK, WORLD_SIZE, MASTER_ADDR, ...) and
        restore the trial; the step it resumes from."""
        from ddaebm import distributed

        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank),
                          MASTER_ADDR=master[0], MASTER_PORT=str(master[1]))
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "ddaebm-torch-extensions"))
        cfg = setup.trial_config(params, trial_id)
        distributed.init(distributed.discover(), cfg.dist.backend, cfg.dist.timeout_s, cfg.dist.device)
        self.run = TrialRun(setup, params, trial_id, rank, world, checkpoint)
        return self.run.resumed_from

    def next_slice(self) -> tuple[dict, str | None, bool]:
        row, ckpt = self.run.next_slice()
        return row, str(ckpt) if ckpt else None, self.run.done


class TrialRanks:
    """The ranks of one trial, started in the trial's placement group and killed with it."""

    def __init__(self, actors: list, trial_id: str):
        self.actors, self.trial_id = actors, trial_id

    @classmethod
    @contextlib.contextmanager
    def start(cls, setup: SweepSetup, params: dict, trial_id: str, checkpoint):
        """The trial's ranks, each in its own bundle, joined and restored; killed on the way out, whatever
        happened (Tune removing the placement group would kill them too, a little later)."""
        import ray
        from ray.util.placement_group import get_current_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        shape, group = setup.shape, get_current_placement_group()
        actor = ray.remote(Rank)
        ranks = cls([actor.options(num_cpus=shape.cpus_per_worker, num_gpus=shape.gpus_per_worker, max_restarts=0,
                                   scheduling_strategy=PlacementGroupSchedulingStrategy(group, i + 1)).remote()
                     for i in range(shape.workers)], trial_id)
        try:
            where = ranks.gather([a.address.remote() for a in ranks.actors], "start", START_TIMEOUT_S)
            master = (where[0][1], where[0][2])
            nodes = [node for node, _, _ in where]
            local = [nodes[:i].count(node) for i, node in enumerate(nodes)]
            ranks.gather([a.begin.remote(setup, params, trial_id, i, shape.workers, local[i], master, checkpoint)
                          for i, a in enumerate(ranks.actors)], "rendezvous and restore", START_TIMEOUT_S)
            yield ranks
        finally:
            for a in ranks.actors:
                ray.kill(a, no_restart=True)

    def next_slice(self) -> tuple[dict, str | None, bool]:
        """All ranks train the next slice; rank 0's (report row, checkpoint, done)."""
        return self.gather([a.next_slice.remote() for a in self.actors], "a training slice")[0]

    def gather(self, refs: list, what: str, timeout: float | None = None) -> list:
        """Every rank's result, failing as soon as one rank fails (the others may be waiting for it in a
        collective), or when `timeout` seconds pass first."""
        import ray

        index = {ref: i for i, ref in enumerate(refs)}
        pending, deadline = list(refs), None if timeout is None else time.monotonic() + timeout
        while pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, pending = ray.wait(pending, num_returns=1, timeout=left)
            if not ready:
                raise RuntimeError(f"trial {self.trial_id}: rank(s) {sorted(index[r] for r in pending)} did not "
                                   f"finish {what} within {timeout:g} s")
            try:
                ray.get(ready[0])
            except Exception as err:  # noqa: BLE001 - a dead actor or the rank's own exception
                cause = err.cause if isinstance(err, ray.exceptions.RayTaskError) else err  # the rank's own error
                raise RuntimeError(f"trial {self.trial_id}: rank {index[ready[0]]} of {len(refs)} failed during "
                                   f"{what}: {type(cause).__name__}: {cause}") from err
        return ray.get(refs)


def run_trial_on_workers(params: dict, setup: SweepSetup) -> None:
    """A Tune function trainable whose trial trains on setup.shape.workers ranks (DeepSpeed), reserved with it
    (`trial_resources`)."""
    from ray import tune

    with TrialRanks.start(setup, params, tune.get_context().get_trial_id(), tune.get_checkpoint()) as ranks:
        while True:
            row, ckpt, done = ranks.next_slice()
            tune.report(row, checkpoint=tune.Checkpoint.from_directory(ckpt) if ckpt else None)
            if done:
                return
