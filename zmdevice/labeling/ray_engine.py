"""`zmdevice label --engine ray`: the local engine's chunks, labeled by a Ray Data actor pool.

The driver (``zmdevice.labeling.run``) opens the data, assigns ids and splits the work into
the same chunks as the local engine (a ``ChunkJob``); ``RayEngine.label_chunks`` sends the
unfinished chunks, one row per teacher batch, through two Ray Data stages:

1. *prepare* (CPU actors, an autoscaling pool): read and decode each sample of the batch with
   the teacher's own ``prepare`` and ``collate``;
2. *teacher* (``--ray-workers`` actors, ``--gpus-per-worker`` GPUs each): load the teacher
   once, predict batch after batch.

Rows carry only positions into the driver's data set, never ids: the ids stay the ones
zmdevice's reader gave (a CSV reader of Ray's own would turn the id ``007`` into ``7``).
The engine gathers the predicted batches of each chunk and, once a chunk is whole, hands it
to the driver, which writes its part file as for the local engine. Batches are the local
engine's batches (whole batches inside a chunk, in its ``labeling_order``: texts shortest
first) and each part goes back to the chunk's order, so the combined file is the same file,
and ``--resume`` may even continue a run the other engine began.

Two ways a Ray Data pipeline stalls are avoided on purpose: teacher actors never take every
CPU (a pool that does leaves none for the prepare stage, which then waits forever), and
every batch is its own block (with few blocks one actor would get all of them).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from zmdevice.errors import UserError
from zmdevice.labeling.batches import (
    ChunkJob,
    Collate,
    LabeledChunk,
    Prepared,
    chunk_progress,
    finish_chunk,
    labeling_order,
)

PREPARE_CPUS = 1.0
"""CPUs kept free for the prepare stage (less on a one-CPU machine)."""
IN_FLIGHT_PER_ACTOR = 2
"""Batches queued at a teacher actor: one to run, one whose input is already on its way."""


def import_ray():
    """``ray`` with Ray Data, or a one-line error naming the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401  (ray without the [data] extra lacks its dependencies)
    except ImportError as error:
        raise UserError(
            f"--engine ray needs Ray Data ({error}); install it with "
            "pip install 'zmdevice[ray]' (or pip install 'ray[data]')"
        ) from None
    return ray


@dataclass(frozen=True)
class PoolPlan:
    """Ray resources of the two stages."""

    teacher_cpus: float
    """CPUs each teacher actor asks for (and torch threads it uses, rounded down, >= 1)."""
    prepare_cpus: float
    """CPUs each prepare actor asks for."""
    prepare_actors: int
    """Most prepare actors the autoscaling pool may start."""


def plan_pool(total_cpus: float, node_cpus: float, workers: int, gpus_per_worker: float):
    """Share the cluster's CPUs between ``workers`` teacher actors and the prepare stage.

    GPU actors need one CPU each to feed their GPU; CPU actors split what is left after the
    prepare stage's share, but no actor may ask for more than a node minus that share, or
    it would not fit on any node beside a prepare actor.

    Args:
        total_cpus: CPUs of the whole cluster.
        node_cpus: CPUs of its largest node.
    """
    prepare_cpus = min(PREPARE_CPUS, total_cpus / 2)
    spare = total_cpus - prepare_cpus
    share = min(spare / workers, node_cpus - prepare_cpus)
    teacher_cpus = min(1.0, share) if gpus_per_worker > 0 else share
    left = total_cpus - workers * teacher_cpus
    return PoolPlan(
        teacher_cpus=teacher_cpus,
        prepare_cpus=prepare_cpus,
        prepare_actors=max(1, math.floor(left / prepare_cpus + 1e-9)),
    )


class PrepareBatch:
    """Ray Data stage 1: positions of one batch -> the teacher's collated input."""

    def __init__(self, dataset, prepare, collate):
        self.dataset, self.prepare, self.collate = dataset, prepare, Collate(collate)

    def __call__(self, row: dict) -> dict:
        view = Prepared(self.dataset, self.prepare, row["indices"])
        try:
            work = self.collate([view[p] for p in range(len(view))])
        except UserError as error:
            work = error
        if isinstance(work, UserError):  # an unreadable image: the driver says it in one line
            return {"chunk": row["chunk"], "batch": row["batch"], "work": None, "error": str(work)}
        return {"chunk": row["chunk"], "batch": row["batch"], "work": work, "error": ""}


class TeacherBatch:
    """Ray Data stage 2: load the teacher once; collated input -> float32 [b, C] probabilities.

    ``UserError`` s (a teacher missing on a node, an unreadable sample upstream) travel on as
    the row's ``error``: Ray would otherwise wrap them in its own task errors, and the user
    should get the one line the local engine prints.
    """

    def __init__(self, spec, classes, templates, device, threads, numerics):
        import torch

        from zmdevice.teachers import build_teacher

        torch.set_num_threads(threads)
        self.teacher, self.error = None, ""
        try:
            precision, runtime = numerics
            self.teacher = build_teacher(
                spec, classes, device=device, templates=templates, precision=precision,
                runtime=runtime,
            )  # fmt: skip
        except UserError as error:
            self.error = str(error)

    def __call__(self, row: dict) -> dict:
        error = row["error"] or self.error
        if error:
            return {"chunk": row["chunk"], "batch": row["batch"], "result": None, "error": error}
        kept, inputs, skipped = row["work"]
        before = dict(self.teacher.stats)
        probs = self.teacher.predict_proba(inputs).numpy() if kept else np.zeros((0, 0), np.float32)
        stats = {k: v - before.get(k, 0) for k, v in self.teacher.stats.items()}
        result = (kept, probs, skipped, stats)
        return {"chunk": row["chunk"], "batch": row["batch"], "result": result, "error": ""}


def batch_rows(dataset, chunks, todo: list[int], batch_size: int, teacher) -> list[dict]:
    """One row per teacher batch of the chunks in ``todo``: chunk, batch number, positions,
    each chunk in the local engine's ``labeling_order`` (texts shortest first, in
    ``teacher``'s tokens)."""
    ordered = {j: labeling_order(dataset, chunks[j], teacher) for j in todo}
    return [
        {"chunk": j, "batch": b, "indices": ordered[j][s : s + batch_size]}
        for j in todo
        for b, s in enumerate(range(0, len(chunks[j]), batch_size))
    ]


RAY_CONNECT_SECONDS = 3.0
"""How long the address check waits for the cluster's port to answer."""
RAY_INIT_WAIT_SECONDS = 15
"""How long ``ray.init`` may try to reach the cluster's GCS before giving up."""


def check_ray_address(address: str | None, timeout: float = RAY_CONNECT_SECONDS) -> None:
    """Fail in one line, within ``timeout`` seconds, when nothing listens at ``address``
    (``HOST:PORT`` or ``ray://HOST:PORT``); ``ray.init`` would wait on it for minutes.
    No address, ``auto`` and ``local`` are Ray's to resolve and pass unchecked.

    Raises:
        UserError: the address is malformed or its port does not answer.
    """
    import socket

    if not address or address in ("auto", "local"):
        return
    where = address.removeprefix("ray://")
    host, _, port = where.rpartition(":")
    host = host.strip("[]")  # [::1]:6379
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(
            f"--ray-address {address}: give HOST:PORT (or ray://HOST:PORT), the address "
            "`ray start --head` printed"
        )
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as error:
        reason = error.strerror or str(error) or type(error).__name__
        raise UserError(
            f"--ray-address {address}: nothing answers at {host}:{port} ({reason}); check "
            "that `ray start --head` runs there and the address is the one it printed"
        ) from None


def _start(ray, address: str | None) -> None:
    import os

    check_ray_address(address)
    # ray.init retries the cluster's GCS about once a second; bound that wait (unless the
    # user set it) for an address that answers but is not a Ray cluster.
    wait = "RAY_gcs_server_port_wait_time_s"
    bounded = address is not None and wait not in os.environ
    if bounded:
        os.environ[wait] = str(RAY_INIT_WAIT_SECONDS)
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as error:
        where = f"--ray-address {address}" if address else "a local Ray cluster"
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error)
        raise UserError(
            f"{where}: could not start or join it ({first}); check that `ray start --head` "
            "runs there and the address is the one it printed"
        ) from None
    finally:
        if bounded:
            os.environ.pop(wait, None)


@dataclass(frozen=True)
class RayEngine:
    """Label on a Ray cluster (``--ray-address``, ``--ray-workers``, ``--gpus-per-worker``);
    the actors build the teacher from the spec and the numerics flags."""

    address: str | None
    workers: int
    gpus_per_worker: float
    teacher: str
    """The teacher spec (``--teacher``) each actor builds."""
    templates: str | None
    precision: str
    runtime: str

    # The actors load their own teacher; the driver's copy, on the CPU, only lends them its
    # preprocessing, fills the metadata and answers --gold.
    driver_device = "cpu"

    def check(self) -> None:
        """A missing extra or a dead cluster fails before anything is written."""
        import_ray()
        check_ray_address(self.address)

    def where(self, device) -> str:
        """What the summary says the samples were labeled on."""
        return f"Ray ({self.workers} teacher workers)"

    def numerics(self, info: dict) -> tuple[str, str]:
        """(precision, runtime) for the teacher actors. CPU actors get what the driver's copy
        resolved (``info``), so every chunk is labeled as the metadata says even on other
        machines; GPU actors resolve the flags themselves (onnx runs on CPUs only)."""
        if self.gpus_per_worker:
            return self.precision, self.runtime
        return info["precision"], info["runtime"]

    def label_chunks(self, job: ChunkJob) -> Iterator[LabeledChunk]:
        """Label the chunks of ``job.todo`` on Ray; yield each as soon as it is whole.

        Joins the cluster at ``address``, or starts a local one (and stops it again when
        the chunks are done or the driver stops) when none is running in this process.
        """
        if job.with_features:  # LabelConfig refuses --refine and --few-shot with Ray
            raise ValueError("the Ray engine labels without features")
        ray = import_ray()
        started_here = not ray.is_initialized()
        if started_here:
            _start(ray, self.address)
        try:
            yield from self._label(ray, job)
        finally:
            if started_here:
                ray.shutdown()

    def _label(self, ray, job: ChunkJob) -> Iterator[LabeledChunk]:
        rows = batch_rows(job.dataset, job.chunks, job.todo, job.batch_size, job.teacher)
        if not rows:
            return
        batches_of = {j: math.ceil(len(job.chunks[j]) / job.batch_size) for j in job.todo}
        pending: dict[int, dict[int, tuple]] = {j: {} for j in job.todo}
        labeled = self._pipeline(ray, job, rows)
        progress = chunk_progress(job)
        try:
            for row in labeled.iter_rows():
                if row["error"]:
                    raise UserError(row["error"])
                number, (kept, _, skipped, _) = row["chunk"], row["result"]
                pending[number][row["batch"]] = row["result"]
                progress.update(len(kept) + len(skipped))
                if len(pending[number]) == batches_of[number]:
                    by_batch = pending.pop(number)
                    results = [by_batch[b] for b in range(batches_of[number])]
                    yield finish_chunk(
                        job, number, [i for r in results for i in r[0]],
                        [r[1] for r in results if r[0]], [i for r in results for i in r[2]],
                        _sum_counts(r[3] for r in results),
                    )  # fmt: skip
        finally:
            progress.close()

    def _pipeline(self, ray, job: ChunkJob, rows: list[dict]):
        """The two Ray Data stages over ``rows`` (see the module doc)."""
        nodes = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
        plan = plan_pool(
            ray.cluster_resources().get("CPU", 0), max(nodes, default=0), self.workers,
            self.gpus_per_worker,
        )  # fmt: skip
        if plan.teacher_cpus <= 0:
            raise UserError(
                f"--ray-workers {self.workers}: the Ray cluster has too few CPUs "
                "for the teacher workers and the prepare stage; add nodes or lower --ray-workers"
            )
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the driver's own bar counts samples, not blocks
        context.enable_operator_progress_bars = False
        device = "cuda" if self.gpus_per_worker > 0 else "cpu"
        teacher = job.teacher
        return (
            ray.data.from_items(rows, override_num_blocks=len(rows))
            .map(
                PrepareBatch,
                fn_constructor_args=(job.dataset, teacher.prepare, teacher.collate),
                compute=ray.data.ActorPoolStrategy(min_size=1, max_size=plan.prepare_actors),
                num_cpus=plan.prepare_cpus,
            )
            .map(
                TeacherBatch,
                fn_constructor_args=(
                    self.teacher, job.classes, self.templates, device,
                    max(1, int(plan.teacher_cpus)), self.numerics(teacher.info),
                ),
                compute=ray.data.ActorPoolStrategy(
                    size=self.workers, max_tasks_in_flight_per_actor=IN_FLIGHT_PER_ACTOR
                ),
                num_cpus=plan.teacher_cpus,
                num_gpus=self.gpus_per_worker,
            )
        )  # fmt: skip


def _sum_counts(counters) -> dict:
    total: dict = {}
    for counts in counters:
        for key, value in counts.items():
            total[key] = total.get(key, 0) + value
    return total
