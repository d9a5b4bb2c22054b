"""torch.distributed for scale-out: ``torchrun --nproc-per-node N -m shiftbench run SUITE``.

Ranks shard the images of every condition (rank r takes images r, r+W, r+2W, ...);
at the end of a condition the accumulator states are summed with ``all_reduce``
(NCCL on CUDA, gloo on CPU) and rank 0 writes them. Without torchrun's environment
everything runs in one process.

When one rank stops (a bad input only rank 0 sees, a full disk where rank 0 writes), the others
learn it from their next collective, which fails: :func:`collective` turns that into one line
(:class:`PeerLost`) instead of the backend's traceback. torchrun then stops the rest and prints its
own report of the exit codes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from shiftbench.errors import ShiftbenchError, one_line


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1  # processes on this node (torchrun's LOCAL_WORLD_SIZE): they share its CPUs and memory

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init(device: torch.device) -> World:
    """Join the process group torchrun describes (if any) and pin the local CUDA device."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return World()
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if device.type == "cuda" and local >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise ShiftbenchError(f"torchrun local rank {local} has no GPU of its own: {n} CUDA device(s) visible "
                              f"on this node; use --nproc-per-node {n} or fewer (NCCL needs one GPU per process), "
                              "or run.device: cpu (gloo)")
    if size > 1 and not tdist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local)
        tdist.init_process_group(backend=backend)
    return World(rank, size, local, int(os.environ.get("LOCAL_WORLD_SIZE", size)))


class PeerLost(ShiftbenchError):
    """A collective failed on this rank because another rank left the run (or stopped answering)."""


@contextmanager
def collective(world: World, what: str) -> Iterator[None]:
    """Run torch.distributed collectives; a backend failure (a peer closed its connection, a timeout)
    becomes :class:`PeerLost`, one line naming this rank, ``what`` it was doing and the backend's reason."""
    try:
        yield
    except RuntimeError as exc:  # gloo and NCCL report a lost peer as RuntimeError (DistBackendError)
        if not world.distributed:
            raise
        reason = re.sub(r"^\[[^\]]*\]\s*", "", one_line(exc))  # drop the backend's source-file prefix
        reason = reason.split(". ")[0].rstrip(".")
        raise PeerLost(f"rank {world.rank} of {world.size} stopped while {what}: another rank left the run "
                       f"(its own message says why; backend: {reason})") from None


def barrier(world: World, what: str) -> None:
    if not world.distributed:
        return
    with collective(world, what):
        if tdist.get_backend() == "nccl":  # name the GPU: NCCL would otherwise guess (and warn)
            tdist.barrier(device_ids=[world.local_rank])
        else:
            tdist.barrier()


def broadcast_object(obj, world: World, what: str):
    """Rank 0's ``obj`` on every rank (``what``: what the ranks are doing, for :func:`collective`'s line)."""
    if not world.distributed:
        return obj
    box = [obj]
    with collective(world, what):
        tdist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj, world: World, what: str) -> list:
    """Every rank's ``obj``, in rank order, on every rank (``what`` as for :func:`broadcast_object`)."""
    if not world.distributed:
        return [obj]
    out = [None] * world.size
    with collective(world, what):
        tdist.all_gather_object(out, obj)
    return out


def shutdown(world: World) -> None:
    if world.distributed and tdist.is_initialized():
        tdist.destroy_process_group()
