"""The one module that talks to `deepspeed.comm`: process setup and a pipeline replica's transfers.

Every direction of traffic has its own process group (stage p -> p+1 for activations, last -> first
for predictions). Under NCCL, PyTorch serializes unbatched isend/irecv of one group like
collectives, so a ring whose ranks post isend then irecv on one group mismatches and crashes;
with one group per direction each group only ever carries sends one way, in the same order on both
ends.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket

import deepspeed.comm as dist
import torch
from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

log = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process(timeout_s: int) -> torch.device:
    """Joins (or, run as a plain single process, makes) the DeepSpeed process group.

    Returns this rank's device; the CUDA device is set before `init_distributed`, as NCCL needs.
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_distributed(
            dist_backend="nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
            verbose=False,
        )
    return device


def world() -> tuple[int, int]:
    return dist.get_rank(), dist.get_world_size()


class PipeComm:
    """Transfers within this rank's pipeline replica."""

    def __init__(self, topology: PipeDataParallelTopology):
        self.topology = topology
        self.rank = dist.get_rank()
        coord = topology.get_coord(self.rank)
        self.stage, self.replica = coord.pipe, coord.data
        self.num_stages = topology.get_dim("pipe")
        self.num_replicas = topology.get_dim("data")
        self.stage_ranks = [topology.get_rank(pipe=p, data=self.replica) for p in range(self.num_stages)]
        self._forward_group = self._return_group = self._pipe_group = None
        # new_group is collective: every rank creates every group, in the same order.
        for replica in range(self.num_replicas):
            ranks = [topology.get_rank(pipe=p, data=replica) for p in range(self.num_stages)]
            if self.num_stages == 1:
                continue
            pipe_group = dist.new_group(ranks=ranks)
            forward = [dist.new_group(ranks=[ranks[p], ranks[p + 1]]) for p in range(self.num_stages - 1)]
            returning = dist.new_group(ranks=[ranks[-1], ranks[0]])
            if replica == self.replica:
                self._pipe_group = pipe_group
                self._forward_group = forward
                self._return_group = returning

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1

    def send_activation(self, hidden: torch.Tensor):
        return dist.isend(hidden.contiguous(), self.stage_ranks[self.stage + 1], group=self._forward_group[self.stage])

    def recv_activation(self, buffer: torch.Tensor):
        return dist.irecv(buffer, self.stage_ranks[self.stage - 1], group=self._forward_group[self.stage - 1])

    def send_prediction(self, pred: torch.Tensor):
        return dist.isend(pred.contiguous(), self.stage_ranks[0], group=self._return_group)

    def recv_prediction(self, buffer: torch.Tensor):
        return dist.irecv(buffer, self.stage_ranks[-1], group=self._return_group)

    def broadcast_from_first(self, tensor: torch.Tensor) -> torch.Tensor:
        """The first stage's `tensor` on every stage of the replica (others pass a buffer)."""
        if self.num_stages > 1:
            dist.broadcast(tensor, self.stage_ranks[0], group=self._pipe_group)
        return tensor

    def barrier(self) -> None:
        dist.barrier()


def share_object(obj):
    """Rank 0's `obj` on every rank (small Python objects: job lists, decisions)."""
    box = [obj]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
