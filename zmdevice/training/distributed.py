"""Data-parallel training: one process (rank) per GPU or per group of CPU cores.

``torchrun --nproc-per-node N -m zmdevice train ...`` (or ``zmdevice train --nproc N``,
which runs that command) starts N ranks of the same run. They keep the single-process
run's global batches: every rank draws the same global batch from the same samplers and
builds its views with the same random stream, then trains on its own equal slice of each
view group (``Ranks.shard``). DistributedDataParallel averages the gradients, so with
equal slices a per-rank mean is the right share of the global mean; the masked means whose
denominator is a count (``Ranks.count_share``) are rescaled to the global count.

What the ranks share: gradients (DDP, through the one ``StepModel`` forward: calling the
student's parts directly would skip DDP's gradient sync), BatchNorm running statistics
(rank 0's, broadcast by DDP; ``SyncBatchNorm`` on GPUs, which refuses CPU tensors), AdaMatch's
batch statistics (``SharedAlignment``), the logged values (averaged), and the stage-1
early-stop and model-selection decisions (rank 0 evaluates and broadcasts, then its
weights). Rank 0 alone writes logs, checkpoints and the student. Dropout draws from a
per-rank, per-step stream (``Ranks.own_rng``) so that the augmentation stream stays the
same on every rank, and a checkpoint (rank 0's random state) resumes every rank exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from zmdevice.cores import affinity_cores, usable_cores
from zmdevice.errors import FlagHint, UserError, write_text_atomic
from zmdevice.losses import DistributionAlignment


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run; the default is a plain single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: evaluates, decides, writes every file."""
        return self.rank == 0

    # ------------------------------------------------------------------ setup

    def start(self, device):
        """Join the process group (nccl on GPUs, gloo on CPU); this rank's device."""
        if not self.active:
            return device
        import torch.distributed as dist

        if ERRORS_VARIABLE not in os.environ:  # under ``launch``, checked before it started us
            local = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
            check_process_count(local, "torchrun --nproc-per-node")
        if device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        elif device.type != "cpu":
            raise UserError(f"--device {device}: several processes train on cuda or cpu only")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return device

    def stop(self) -> None:
        if self.active:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()

    def threads(self, cores: int) -> int:
        """CPU threads of this rank: OMP_NUM_THREADS if set (torchrun sets 1 unless given
        one; ``launch`` sets a fair share), else a fair share of the cores."""
        if not self.active:
            return cores
        if os.environ.get("OMP_NUM_THREADS"):
            return torch.get_num_threads()
        return max(1, cores // self.world_size)

    def check_config(self, plans, config) -> None:
        """Every batch of every stage must split into equal slices; --time-budget (whose
        step probe and clock are per process) runs on one process only, for now."""
        if self.active and config.time_budget is not None:
            raise UserError(
                "time_budget: a time budget runs on one process only, for now; drop it or "
                "train without --nproc / torchrun"
            )
        for plan in plans:
            for name in plan.batch_fields():
                size = getattr(config, name)
                if size % self.world_size:
                    raise UserError(
                        f"{name} = {size} does not split over {self.world_size} processes: "
                        f"set it to a multiple of {self.world_size} in --config"
                    )

    def prepare(self, student, device) -> None:
        """BatchNorm across GPUs: SyncBatchNorm there (it refuses CPU tensors)."""
        if self.active and device.type == "cuda":
            torch.nn.SyncBatchNorm.convert_sync_batchnorm(student)

    def wrap(self, model, device):
        """The step module every training forward goes through (DDP when distributed).

        Called again when stage 2 attaches the KD head, so DDP syncs its gradients too.
        """
        if not self.active:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=True)

    def alignment(self, num_classes: int, momentum: float) -> DistributionAlignment:
        if not self.active:
            return DistributionAlignment(num_classes, momentum)
        return SharedAlignment(num_classes, momentum, world_size=self.world_size)

    # ------------------------------------------------------------------ every step

    def shard(self, plan, data, batch: dict) -> dict:
        """This rank's slice of each view group of a global batch (indices and inputs)."""
        if not self.active:
            return batch
        sizes = [len(indices) for _, indices in plan.view_groups(data, batch)]
        rows, start = [], 0
        for size in sizes:
            rows.append(torch.arange(start, start + size)[self.part(size)])
            start += size
        rows = torch.cat(rows)
        sliced = {key: value[self.part(len(value))] for key, value in batch.items()
                  if key in ("labeled", "pool")}  # fmt: skip
        sliced["inputs"] = {key: value[rows] for key, value in batch["inputs"].items()}
        return sliced

    def part(self, size: int) -> slice:
        share = size // self.world_size
        return slice(self.rank * share, (self.rank + 1) * share)

    def own_rng(self, seed: int, global_step: int, device):
        """Dropout's random stream for this rank and step, apart from the augmentation
        stream (which must stay the same on every rank); a no-op in one process."""
        if not self.active:
            return contextlib.nullcontext()
        return _seeded_fork(((seed * 1_000_003 + global_step) * 1024 + self.rank) % 2**63, device)

    def count_share(self, local_count, device):
        """Factor turning a mean over this rank's ``local_count`` counted rows into its
        share of the mean over the global batch's counted rows (1 in one process)."""
        if not self.active:
            return 1.0
        import torch.distributed as dist

        total = torch.as_tensor(local_count, dtype=torch.float32, device=device).clone()
        dist.all_reduce(total)
        return self.world_size * local_count / total.clamp(min=1)

    def mean_values(self, values: dict, device) -> dict:
        """The logged values averaged over ranks (the global batch's, for plain means)."""
        if not self.active:
            return values
        import torch.distributed as dist

        keys = sorted(values)
        stacked = torch.tensor([values[key] for key in keys], dtype=torch.float64, device=device)
        dist.all_reduce(stacked)
        return dict(zip(keys, (stacked / self.world_size).tolist(), strict=True))

    # ------------------------------------------------------------------ decisions

    def decide(self, decide_on_main) -> bool:
        """Run ``decide_on_main()`` on rank 0 only and give every rank its answer."""
        if not self.active:
            return decide_on_main()
        import torch.distributed as dist

        answer = [decide_on_main() if self.is_main else None]
        dist.broadcast_object_list(answer, src=0)
        return bool(answer[0])

    def share_weights(self, module) -> None:
        """Every rank takes rank 0's parameters and buffers (after model selection)."""
        if not self.active:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for tensor in module.state_dict().values():
                dist.broadcast(tensor, src=0)

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()


def _seeded_fork(seed: int, device):
    devices = [device] if device.type == "cuda" else []

    @contextlib.contextmanager
    def fork():
        with torch.random.fork_rng(devices=devices, device_type=device.type):
            torch.manual_seed(seed)
            yield

    return fork()


class SharedAlignment(DistributionAlignment):
    """AdaMatch's running distributions and threshold from the global batch: each rank's
    batch means (equal slices) are averaged over the ranks."""

    def __init__(self, num_classes: int, momentum: float, world_size: int):
        super().__init__(num_classes, momentum)
        self.world_size = world_size

    def batch_mean(self, values):
        import torch.distributed as dist

        mean = values.detach().float().mean(dim=0)
        dist.all_reduce(mean)
        return mean / self.world_size


def ranks_from_environment() -> Ranks:
    """The rank torchrun gave this process (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Ranks()
    return Ranks(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))


ERRORS_VARIABLE = "ZMDEVICE_RANK_ERRORS"
"""Set by ``launch``: the folder where a rank leaves its one-line error for the launcher."""


@contextlib.contextmanager
def worker_errors(ranks: Ranks):
    """Say a ``UserError`` of a distributed run once, not once per rank.

    Under ``launch`` every rank leaves its message in the launcher's folder and exits with
    code 2 silently; the launcher prints the first rank's message. Under a plain torchrun,
    rank 0 raises it (the CLI prints it) and the other ranks exit with code 2 silently.
    In one process this does nothing.
    """
    try:
        yield
    except UserError as error:
        if not ranks.active:
            raise
        folder = os.environ.get(ERRORS_VARIABLE)
        if folder:
            said = {"message": error.message, "hint": dataclasses.asdict(error.hint)
                    if error.hint else None}  # fmt: skip
            with contextlib.suppress(OSError):
                write_text_atomic(Path(folder) / f"rank{ranks.rank:06d}.json", json.dumps(said))
        if folder or not ranks.is_main:
            raise SystemExit(2) from None
        raise


def first_rank_error(folder: Path) -> UserError | None:
    """The error the lowest failing rank left in ``folder`` (see ``worker_errors``)."""
    for path in sorted(folder.glob("rank*.json")):
        try:
            said = json.loads(path.read_text(encoding="utf-8"))
            hint = FlagHint(**said["hint"]) if said.get("hint") else None
            return UserError(str(said["message"]), hint=hint)
        except (OSError, ValueError, TypeError, KeyError):
            continue
    return None


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``torchrun --nproc-per-node nproc -m zmdevice ARGV``; its exit code.

    torchrun runs in this process (its elastic agent starts the ranks), so that a failed
    rank ends in one line rather than torchrun's traceback and failure table: a
    ``UserError`` of a rank is raised here once (the CLI prints it, exit code 2).

    Raises:
        UserError: a bad process count (before anything starts), or a rank's error.
    """
    import logging
    import tempfile

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    command = torchrun_command(nproc, argv)
    check_process_count(nproc, "--nproc")
    args = get_args_parser().parse_args(command[3:])  # after: python -m torch.distributed.run
    elastic = logging.getLogger("torch.distributed")
    level = elastic.level
    with tempfile.TemporaryDirectory(prefix="zmdevice-ranks-") as folder:
        # torchrun would give each rank 1 thread; a CPU run gets its share of the cores.
        threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, usable_cores() // nproc))
        saved = {name: os.environ.get(name) for name in ("OMP_NUM_THREADS", ERRORS_VARIABLE)}
        os.environ.update({"OMP_NUM_THREADS": threads, ERRORS_VARIABLE: folder})
        elastic.setLevel(logging.CRITICAL)  # its per-rank "failed (exitcode ...)" lines
        try:
            run(args)
        except ChildFailedError as failure:
            said = first_rank_error(Path(folder))
            if said is not None:
                raise said from None
            rank, info = failure.get_first_failure()
            print(
                f"error: training process {rank} failed with exit code {info.exitcode}; its "
                "error is printed above",
                file=sys.stderr,
            )
            return 1
        finally:
            elastic.setLevel(level)
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
    return 0


def check_process_count(nproc: int, flag: str) -> None:
    """Refuse more processes on this machine than cores it may use (each rank needs one):
    a typo such as ``--nproc 100000`` would start that many processes."""
    cores = affinity_cores()
    if nproc > cores:
        raise UserError(
            f"{flag} {nproc}: this machine lets zmdevice use {cores} CPU core(s), and every "
            f"process needs one; give at most {cores}"
        )


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """The torchrun command line for ``zmdevice ARGV`` on ``nproc`` ranks, without --nproc.

    Raises:
        UserError: ``nproc`` below 1, or a nested launch.
    """
    if nproc < 1:
        raise UserError(f"--nproc {nproc}: give 1 or more processes")
    if "WORLD_SIZE" in os.environ:
        raise UserError("--nproc: this process was already started by torchrun; drop --nproc")
    rest, skip_next = [], False
    for arg in argv:  # the ranks run the same command without --nproc
        if skip_next or arg.startswith("--nproc="):
            skip_next = False
            continue
        skip_next = arg == "--nproc"
        if not skip_next:
            rest.append(arg)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", "-m", "zmdevice", *rest]  # fmt: skip
