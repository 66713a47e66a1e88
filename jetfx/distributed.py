"""The process group of a job started by `torchrun`, and the few collectives jetfx's jobs need.

`join()` joins the group torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT): CPU tensors travel by gloo, CUDA tensors by NCCL (the backend
"cpu:gloo,cuda:nccl" when torch has CUDA), and `use_device` says where the job's data lives (each
rank's GPU: `rank_device`). Steps that may fail on one rank only (loading the model, opening the
database) are run through `checked`, so that every rank stops, not only the one that failed.
Without torchrun, or with one process, `join()` returns a group of one whose collectives hand back
their input, so that a single process runs the same code.

Everything crosses between ranks as plain tensors: sizes first, then the rows, padded to the
largest. Nothing a peer sends is ever unpickled (torch's `*_object` collectives would).
"""

from __future__ import annotations

import os
import re
import socket

import torch

from .errors import InputError, JetfxError


class PeerLost(RuntimeError):
    """A collective failed: another rank stopped (killed, crashed, or interrupted)."""


class FailedElsewhere(InputError):
    """Another rank failed a step that every rank must pass (its message, with its rank and host)."""

    def __init__(self, rank: int, host: str, message: str):
        super().__init__(f"rank {rank} (on {host}): {message}")
        self.rank, self.host = rank, host


class Group:
    """A group of one process (the base case); `_TorchGroup` is torch.distributed's."""

    rank = 0
    world = 1
    local_rank = 0
    local_world = 1
    backend = None

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)  # where the job's tensors are exchanged
        self.hosts = [socket.gethostname()]

    def use_device(self, device: torch.device | str) -> None:
        """Exchange the job's tensors on `device` (the model's): NCCL for a GPU, gloo for the CPU."""
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def checked(self, step):
        """`step()` on every rank; if it raises a JetfxError or an OSError on any rank, every rank
        raises (see `agree`)."""
        error = result = None
        try:
            result = step()
        except (JetfxError, OSError) as e:
            error = e
        self.agree(error)
        return result

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes results and prints."""
        return self.rank == 0

    def describe(self) -> str:
        """'2 ranks on 1 host (gloo)'."""
        hosts = len(set(self.hosts))
        backend = ("nccl" if self.device.type == "cuda" else "gloo") if self.backend else None
        return (f"{self.world} rank{'s' if self.world != 1 else ''} on {hosts} host{'s' if hosts != 1 else ''}"
                + (f" ({backend})" if backend else ""))

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's tensor on every rank (any shape; the others' `t` gives only the dtype)."""
        return t

    def all_gather(self, t: torch.Tensor, sizes: list[int] | None = None) -> list[torch.Tensor]:
        """Every rank's tensor, in rank order (first dimensions may differ, `sizes` if known; the
        other dimensions and the dtype must match)."""
        return [t]

    def gather(self, t: torch.Tensor, sizes: list[int] | None = None) -> list[torch.Tensor] | None:
        """Every rank's tensor at rank 0 (None elsewhere)."""
        return [t]

    def agree(self, error: BaseException | None) -> None:
        """Every rank learns whether any rank failed a step: then all raise (the failed rank its own
        error, the others `FailedElsewhere` with its message), so that no rank waits forever for
        one that stopped."""
        if error is not None:
            error.agreed = True  # every rank knows: rank 0 reports it
            raise error

    def close(self, synchronize: bool = False) -> None:
        pass


class _TorchGroup(Group):
    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        self.rank, self.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        self.backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        self.device = self.control = torch.device("cpu")  # control messages always go by gloo
        try:
            if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
                # torchrun keeps its store across restarts (--max-restarts): the keys of the ranks
                # that stopped are still there, and gloo would dial their dead addresses (torch 2.13;
                # pytorch/pytorch#135712). Each attempt gets its own prefix.
                store, _, _ = next(dist.rendezvous("env://"))
                attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
                dist.init_process_group(self.backend, store=dist.PrefixStore(f"jetfx/attempt{attempt}", store),
                                        rank=self.rank, world_size=self.world)
            else:
                dist.init_process_group(self.backend)
        except (RuntimeError, ValueError) as e:
            raise InputError(f"could not join the torchrun job (rank {self.rank} of {self.world}): {e}") from None
        name = socket.gethostname().encode()[:255]
        self.hosts = [bytes(h.tolist()).decode(errors="replace")
                      for h in self._all_gather(torch.tensor(list(name), dtype=torch.uint8), self.control)]

    def _run(self, op, *args, **kw):
        try:
            return op(*args, **kw)
        except RuntimeError as e:  # gloo: "Connection reset by peer"; NCCL: a remote error or a timeout
            raise PeerLost(_first_sentence(e)) from None

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        shape = torch.tensor([t.dim(), *t.shape] + [0] * (8 - t.dim()), dtype=torch.long)
        self._run(self.dist.broadcast, shape, 0)
        dims = [int(s) for s in shape[1:1 + int(shape[0])]]
        out = t.to(self.device) if self.main else torch.empty(dims, dtype=t.dtype, device=self.device)
        if out.numel():
            self._run(self.dist.broadcast, out, 0)
        return out

    def _sizes(self, t: torch.Tensor) -> list[int]:
        sizes = [torch.zeros(1, dtype=torch.long) for _ in range(self.world)]
        self._run(self.dist.all_gather, sizes, torch.tensor([t.shape[0]]))
        return [int(s) for s in sizes]

    def all_gather(self, t: torch.Tensor, sizes: list[int] | None = None) -> list[torch.Tensor]:
        return self._all_gather(t, self.device, sizes)

    def _all_gather(self, t: torch.Tensor, device: torch.device, sizes: list[int] | None = None):
        sizes = sizes or self._sizes(t)
        top = max(sizes)
        if top == 0:
            return [torch.zeros((0, *t.shape[1:]), dtype=t.dtype, device=device) for _ in sizes]
        out = [torch.empty((top, *t.shape[1:]), dtype=t.dtype, device=device) for _ in sizes]
        self._run(self.dist.all_gather, out, _padded(t, top, device))
        return [o[:s] for o, s in zip(out, sizes)]

    def gather(self, t: torch.Tensor, sizes: list[int] | None = None) -> list[torch.Tensor] | None:
        sizes = sizes or self._sizes(t)
        top = max(sizes)
        if top == 0:
            return [torch.zeros((0, *t.shape[1:]), dtype=t.dtype, device=self.device) for _ in sizes] if self.main else None
        out = [torch.empty((top, *t.shape[1:]), dtype=t.dtype, device=self.device) for _ in sizes] if self.main else None
        self._run(self.dist.gather, _padded(t, top, self.device), out, dst=0)
        return [o[:s] for o, s in zip(out, sizes)] if self.main else None

    def agree(self, error: BaseException | None) -> None:
        flags = [int(f) for f in self._all_gather(torch.tensor([int(error is not None)]), self.control, [1] * self.world)]
        failed = [r for r, f in enumerate(flags) if f]
        if not failed:
            return
        src = failed[0]
        text = f"{error}".encode()[:4000] if self.rank == src else b""
        n = torch.tensor([len(text)])
        self._run(self.dist.broadcast, n, src)
        message = torch.tensor(list(text), dtype=torch.uint8) if self.rank == src else torch.empty(int(n), dtype=torch.uint8)
        if int(n):
            self._run(self.dist.broadcast, message, src)
        if error is not None:
            error.agreed = True
            raise error
        raise FailedElsewhere(src, self.hosts[src], bytes(message.tolist()).decode(errors="replace"))

    def close(self, synchronize: bool = False) -> None:
        """Leave the group. `synchronize`: this rank finished normally — meet the others at a barrier
        first, so that no rank tears its connections down while another still uses them (gloo then
        aborts the process at exit: "terminate called without an active exception")."""
        if self.dist.is_initialized():
            if synchronize:
                try:
                    self.dist.barrier()
                except RuntimeError:  # a rank already gone: nothing left to wait for
                    pass
            self.dist.destroy_process_group()


def _first_sentence(e: BaseException) -> str:
    """'[…/pair.cc:537] Read error […]: Connection reset by peer. This is typically …' → 'Read error
    […]: Connection reset by peer'."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", text)
    return text.split(". ")[0].rstrip(".")


def _padded(t: torch.Tensor, size: int, device: torch.device) -> torch.Tensor:
    out = torch.zeros((size, *t.shape[1:]), dtype=t.dtype, device=device)
    out[: t.shape[0]] = t
    return out


def under_torchrun() -> bool:
    """Whether this process is one of several started by torchrun (or an equivalent launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def rank_device(device: str | None) -> str | None:
    """The device of this rank: under torchrun, 'cuda' means cuda:LOCAL_RANK (one GPU a rank), and
    a GPU named by index would be shared by the node's ranks (NCCL refuses that), so it is refused."""
    if not under_torchrun() or not device or not device.startswith("cuda"):
        return device
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device == "cuda":
        return f"cuda:{local}"
    if int(os.environ.get("LOCAL_WORLD_SIZE", 1)) > 1:
        raise InputError(f"--device {device} under torchrun with several processes a node: give --device cuda "
                         "(each rank then takes cuda:LOCAL_RANK; CUDA_VISIBLE_DEVICES picks the GPUs)")
    return device


def join() -> Group:
    """This process's group: torch.distributed's when started by torchrun with several processes,
    else a group of one."""
    if not under_torchrun():
        return Group()
    import torch.distributed as dist

    if not dist.is_available():
        raise InputError("this torch was built without torch.distributed; run one process (without torchrun)")
    return _TorchGroup()
