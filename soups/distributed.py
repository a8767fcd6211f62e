"""Data-parallel fine-tuning with torch.distributed, as `torchrun` launches it: this process's
rank and world, the process group (gloo on CPUs, NCCL on GPUs), and the few collective steps the
training loop needs. No MLflow here: rank 0 alone talks to the tracking server (soups/steps/finetune.py)."""

from __future__ import annotations

import datetime
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from soups import SoupsError

# A rank that dies mid-collective is noticed by its peers when its sockets close; this bounds the
# wait when it is not (a hung peer, a partitioned network): the others then fail instead of hanging.
TIMEOUT = datetime.timedelta(seconds=int(os.environ.get("SOUPS_DIST_TIMEOUT_S", "300")))


class Terminated(SystemExit):
    """SIGTERM (torchrun stopping the other workers of a failed rank, or a preemption): raised so
    that the run ends FAILED and nothing half-done is logged, instead of the process vanishing."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.size > 1


SINGLE = World()


def from_env() -> World:
    """The world `torchrun` describes in RANK / WORLD_SIZE / LOCAL_RANK (a single process without)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))


def device_for(world: World) -> torch.device:
    """The GPU of this rank on its node (LOCAL_RANK), else the CPU."""
    if torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank)
        return torch.device("cuda", world.local_rank)
    return torch.device("cpu")


def _terminate(signum: int, frame: Any) -> None:
    # Once: the cleanup that marks the run FAILED must not be cut short by a second SIGTERM.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated(f"stopped by signal {signal.Signals(signum).name}")


@contextmanager
def joined(world: World) -> Iterator[World]:
    """Join the process group for the body (nothing to join for a single process); SIGTERM
    becomes `Terminated` while inside."""
    if not world.parallel:
        yield world
        return
    if dist.is_initialized():  # an outer step joined already
        yield world
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        # Before the first collective: NCCL's object broadcasts (the start's digest, a resumed
        # state) run on the current device, and every rank would otherwise use cuda:0.
        torch.cuda.set_device(world.local_rank)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        dist.init_process_group(backend, rank=world.rank, world_size=world.size, timeout=TIMEOUT)
    except (RuntimeError, ValueError) as e:
        raise SoupsError(f"rank {world.rank} of {world.size} could not join the process group: {e}") from None
    try:
        yield world
    finally:
        signal.signal(signal.SIGTERM, previous)
        dist.destroy_process_group()


def broadcast(obj: Any, world: World) -> Any:
    """Rank 0's `obj` on every rank (a resumed training state, the start weights' digest)."""
    if not world.parallel:
        return obj
    box = [obj if world.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_batch(batch_size: int, world: World) -> int:
    """Each rank's share of a global batch: the recipe's batch_size is the batch one optimizer
    step sees, so that N ranks take the same steps as one process."""
    if batch_size % world.size:
        raise SoupsError(
            f"batch_size={batch_size} does not split evenly over {world.size} processes: pick a "
            f"multiple of {world.size}"
        )
    return batch_size // world.size


class RankBatches(torch.utils.data.Sampler):
    """This rank's share of each global batch: the batches one process would draw (same sampler,
    same generator), each cut into `world.size` equal parts. Together the ranks see the very
    images of a single-process epoch, none twice."""

    def __init__(self, batches: torch.utils.data.BatchSampler, world: World):
        self.batches, self.world = batches, world

    def __iter__(self):
        for batch in self.batches:
            yield batch[self.world.rank :: self.world.size]

    def __len__(self) -> int:
        return len(self.batches)


def launched() -> bool:
    """Whether torchrun (or another launcher of its kind) started this process."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def torchrun_command(nproc: int, script: str, args: list[str]) -> list[str]:
    """The command that runs `script args` as `nproc` processes on this machine (torchrun's
    standalone rendezvous); several machines use torchrun itself (README). The `--` keeps
    torchrun's parser from taking the script's options for abbreviations of its own (`--start`
    would be an ambiguous `--start-method`)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*launcher, "--", script, *args]
