"""The one module that talks to `deepspeed.comm`: process setup and a pipeline replica's transfers.

All transfers of a replica go through one process group, as one `batch_isend_irecv` per schedule
tick. The schedule puts both ends of every message in the same tick, so every rank issues the same
matched batches in the same order; a batch is posted without waiting (`post`), and only the use of
a received buffer waits for it. NCCL needs that: its kernels block until the peer arrives and
CUDA does not promise that two streams progress independently, so unbatched isend/irecv on
separate groups or posted in different orders on different ranks can deadlock (seen on 2x H200),
and a ring that posts isend then irecv on one group crashes.

A rank that dies or hangs ends the run in bounded time: a transfer with a dead peer fails at once
(gloo: "connection closed by peer"), one with a hung peer after the process group's timeout
(`comm_timeout_s`, which the pipeline groups get too), and the error names the peer ranks. The
failing rank exits non-zero and DeepSpeed's launcher then stops every other rank.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os

import deepspeed.comm as dist
import torch
import torch.distributed

from ..files import free_port

log = logging.getLogger(__name__)

def init_process(timeout_s: int) -> torch.device:
    """Joins (or, run as a plain single process, makes) the DeepSpeed process group.

    Returns this rank's device; the CUDA device is set before `init_distributed`, as NCCL needs.
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        # NCCL's streams at the highest priority, as the pipeline's (generation.Generator), so that the
        # transfers keep their footing against the block-steps and only the decode yields (output/stream.py)
        os.environ.setdefault("TORCH_NCCL_HIGH_PRIORITY", "1")
    if not dist.is_initialized():
        with _without_shm_op(device.type == "cpu"):
            dist.init_distributed(
                dist_backend="nccl" if device.type == "cuda" else "gloo",
                timeout=datetime.timedelta(seconds=timeout_s),
                verbose=False,
            )
    return device


_SHM_OP = "deepspeed_shm_comm"  # DeepSpeed's CPU shared-memory all-reduce (ShareMemCommBuilder.NAME)


@contextlib.contextmanager
def _without_shm_op(skip: bool):
    """The pipeline never all-reduces (its transfers are point to point, its few collectives gather
    objects), yet DeepSpeed's CPU backend builds (g++, ~90 s on a fresh machine) and loads a
    shared-memory all-reduce op at init, leaves a 69 MB buffer per rank in /dev/shm, and waits forever
    on the build's lock if a killed run left it. DeepSpeed builds it only when its op table marks it
    compatible, so the entry is marked incompatible while a CPU world initialises.

    DeepSpeed fills the table on its first reading, by probing every op builder (~0.1 s and ~100
    modules, setuptools' among them). While nothing has read it, a table of this one entry stands in
    during the start and is taken away after it, so no probe runs for an answer known in advance (a
    later reading probes as before)."""
    if not skip:
        yield
        return
    import deepspeed.ops

    names = vars(deepspeed.ops)
    if "__compatible_ops__" not in names:  # unread: the module's __getattr__ would probe now
        names["__compatible_ops__"] = {_SHM_OP: False}
        try:
            yield
        finally:
            names.pop("__compatible_ops__", None)
        return
    table = deepspeed.ops.__compatible_ops__
    saved = table.get(_SHM_OP)
    table[_SHM_OP] = False
    try:
        yield
    finally:
        if saved is None:
            table.pop(_SHM_OP, None)
        else:
            table[_SHM_OP] = saved


class CommError(RuntimeError):
    """A transfer failed: a peer rank died, hung past the timeout, or the network broke."""


def launched_world() -> tuple[int, int]:
    """(rank, world size) the launcher gave this process ((0, 1) for a plain process), known before
    the process group starts."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_started() -> bool:
    """Whether this process has joined the process group (`init_process`)."""
    return dist.is_initialized()


def world() -> tuple[int, int]:
    return dist.get_rank(), dist.get_world_size()


def _first_line(err: BaseException) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__


@contextlib.contextmanager
def _collective(what: str):
    """A collective over every rank: a failure names this rank and what it waited for (a collective
    cannot tell which peer did not come; the failing or hung rank's own log line names it)."""
    try:
        yield
    except RuntimeError as err:
        raise CommError(f"rank {dist.get_rank()}: {what} over all {dist.get_world_size()} ranks failed "
                        f"(a rank died or did not answer within comm_timeout_s): {_first_line(err)}") from err


def barrier() -> None:
    with _collective("barrier"):
        dist.barrier()


class PipeComm:
    """Transfers within this rank's pipeline replica."""

    def __init__(self, topology, timeout_s: int):
        self.rank = dist.get_rank()
        coord = topology.get_coord(self.rank)
        self.stage, self.replica = coord.pipe, coord.data
        self.num_stages = topology.get_dim("pipe")
        self.num_replicas = topology.get_dim("data")
        self.stage_ranks = [topology.get_rank(pipe=p, data=self.replica) for p in range(self.num_stages)]
        self._group = None
        # torch's new_group does not inherit the default group's timeout (it falls back to 30 min for
        # gloo, 10 for NCCL), so the groups get `timeout_s`, the one `init_process` was given.
        timeout = datetime.timedelta(seconds=timeout_s)
        # new_group is collective: every rank creates every replica's group, in the same order.
        # torch's own, for the timeout: deepspeed.comm.new_group takes only the ranks.
        for replica in range(self.num_replicas):
            ranks = [topology.get_rank(pipe=p, data=replica) for p in range(self.num_stages)]
            group = torch.distributed.new_group(ranks=ranks, timeout=timeout) if self.num_stages > 1 else None
            if replica == self.replica:
                self._group = group

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    def post(self, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]]) -> Transfers:
        """Starts the tick's batch of sends (tensor, to stage) and receives (buffer, from stage) and
        returns at once; `wait()` on the result before using a received buffer (on CUDA the host is
        never held: the current stream waits). The sent tensors are kept until the batch is waited for."""
        ops = [dist.P2POp(dist.isend, t.contiguous(), self.stage_ranks[p], self._group) for t, p in sends]
        ops += [dist.P2POp(dist.irecv, b, self.stage_ranks[p], self._group) for b, p in recvs]
        peers = sorted({self.stage_ranks[p] for _, p in sends + recvs})
        if not ops:
            return Transfers([], [], self.rank, peers)
        try:
            return Transfers(dist.batch_isend_irecv(ops), [op.tensor for op in ops], self.rank, peers)
        except RuntimeError as err:
            raise CommError(f"rank {self.rank}: transfer with rank(s) {peers} failed: {_first_line(err)}") from err

    def broadcast_from_first(self, tensor: torch.Tensor) -> torch.Tensor:
        """The first stage's `tensor` on every stage of the replica (others pass a buffer)."""
        if self.num_stages > 1:
            try:
                dist.broadcast(tensor, self.stage_ranks[0], group=self._group)
            except RuntimeError as err:
                raise CommError(f"rank {self.rank}: broadcast from rank {self.stage_ranks[0]} to ranks "
                                f"{self.stage_ranks} failed: {_first_line(err)}") from err
        return tensor


class Transfers:
    """One posted batch of sends and receives (`PipeComm.post`)."""

    def __init__(self, requests: list, tensors: list[torch.Tensor], rank: int, peers: list[int]):
        self._requests = requests
        self._tensors = tensors  # alive until the transfers are done
        self._rank, self._peers = rank, peers

    def wait(self) -> None:
        """Blocks until done (gloo), or makes the current CUDA stream wait for it (NCCL); once."""
        requests, self._requests = self._requests, []
        try:
            for request in requests:
                request.wait()
        except RuntimeError as err:
            raise CommError(f"rank {self._rank}: transfer with rank(s) {self._peers} failed: {_first_line(err)}") from err
        self._tensors = []

    def done(self) -> bool:
        """Whether every transfer has finished (never blocks); a finished batch lets its tensors go."""
        if all(request.is_completed() for request in self._requests):
            self._requests, self._tensors = [], []
            return True
        return False


def share_object(obj):
    """Rank 0's `obj` on every rank (small Python objects: job lists, decisions)."""
    box = [obj]
    if dist.get_world_size() > 1:
        with _collective("sharing rank 0's decisions"):
            dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    with _collective("gathering every rank's state"):
        dist.all_gather_object(out, obj)
    return out


def shutdown() -> None:
    """Leave the process group cleanly (NCCL ranks that skip this can hang at exit)."""
    if dist.is_initialized():
        barrier()
        dist.destroy_process_group()


def several_ranks() -> bool:
    """True when this process is one rank of several. After a failure its peers may be dead or hung, so
    it must not wait for them: no collective shutdown (a barrier waits comm_timeout_s for a hung peer),
    and no communicator destructors at exit (NCCL's can block); `cli.main` leaves with `os._exit`."""
    return dist.is_initialized() and dist.get_world_size() > 1
