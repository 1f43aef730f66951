"""Data parallelism under torchrun: one process per device, each with a full copy of the model,
each computing the gradient of its own share of a step, summed across processes.

    torchrun --standalone --nproc_per_node 2 sft.py ...       (docs/distributed.md)

`launch(device, timeout)` reads the variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) and yields a `World`; sft.py and grpo.py talk to the other processes
only through it.

Design choices, and why:
- torchrun starts the processes, on one node or several, and stops the survivors on a node when
  one of its processes fails; we add no launcher of our own. Without its variables (plain
  `python sft.py`) or with one process, `launch` yields World(0, 1), whose every method returns
  at once: torch.distributed is not touched at all.
- Gradients are summed with all_reduce after the last micro-batch, not by
  DistributedDataParallel. Each stage already divides its loss by the whole step's count (SFT:
  learned tokens of the step; GRPO: tokens or episodes of the batch), so the sum over ranks IS
  the one-process gradient, and a step on N ranks equals a step in one process on the same
  global batch (a test compares the weights). DDP would need every rank to run the same number
  of passes through `forward`; here ranks may get different numbers of micro-batches (or none),
  SFT computes its logits outside `forward` and GRPO back-propagates a group's prompt in a
  backward of its own. Only parameters that require grad are summed (frozen layers, adapters);
  one that got no gradient on a rank counts as zero there. The price: no overlap of
  communication with the backward pass.
- Every collective goes through World, which turns its failure into RankLost, one line naming
  this rank and what it was waiting for: a peer that died closes its connections (the
  collective fails at once), a peer that stalls makes it fail after --dist-timeout. torchrun
  stops the other processes on the dead one's node with SIGTERM, which `launch` also turns into
  one line. RankLost is a SystemExit (status 1): no `except Exception` on the way swallows it.
- Rank 0 alone writes (run folder, metrics, checkpoints, `latest`) and evaluates; the others
  read what it wrote (`main_first`), so --runs-dir must be a filesystem every node sees. Ranks
  build or load their model themselves, from the same seed or checkpoint; `check_same` then
  compares a checksum of the weights and the resume step across ranks, so a node that sees a
  different run folder stops the run at its start instead of training another model.
- Under torchrun a rank that has finished (the group destroyed, every file written) leaves with
  `os._exit` after flushing its output (`exit_process`), skipping the interpreter's teardown:
  there, threads that gloo or an abandoned callee left behind could abort the process
  ("terminate called without an active exception", SIGABRT), and torchrun would report a run
  that saved everything as failed.
"""
import contextlib
import datetime
import os
import signal
import sys
from dataclasses import dataclass

import torch

import cli


class RankLost(SystemExit):
    """A collective failed or torchrun stopped this rank: one line on stderr, exit status 1."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, items) -> list:
        """This rank's items: every size-th one from the rank's own index on."""
        return list(items)[self.rank::self.size]

    def sum(self, *values: float) -> list[float]:
        """Each value summed over the ranks (float64)."""
        if self.size == 1:
            return [float(v) for v in values]
        t = torch.tensor(values, dtype=torch.float64, device=self._device())
        self._collective("sum of statistics", torch.distributed.all_reduce, t)
        return t.tolist()

    def gather(self, obj) -> list:
        """Every rank's object (picklable), in rank order, on every rank."""
        if self.size == 1:
            return [obj]
        out = [None] * self.size
        self._collective("gather", torch.distributed.all_gather_object, out, obj)
        return out

    def sum_grads(self, model: torch.nn.Module, bucket: int = 1 << 24) -> None:
        """Sum the gradients of the parameters that require grad over the ranks, in flat
        buckets of about `bucket` elements (one all_reduce each instead of one per tensor)."""
        if self.size == 1:
            return
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            return
        reached = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
        self._collective("sum of gradients", torch.distributed.all_reduce, reached)
        for p in params:
            if p.grad is None:   # no micro-batch of this rank reached it: it contributes zero
                p.grad = torch.zeros_like(p)
        start = 0
        while start < len(params):
            end, n = start, 0
            while end < len(params) and (n == 0 or n + params[end].numel() <= bucket):
                n += params[end].numel()
                end += 1
            grads = [p.grad for p in params[start:end]]
            flat = torch.cat([g.reshape(-1) for g in grads])
            self._collective("sum of gradients", torch.distributed.all_reduce, flat)
            for g, piece in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(piece.view_as(g))
            start = end
        for p, n in zip(params, reached.tolist()):
            if n == 0:   # no rank reached it: no gradient, as in one process (AdamW leaves it alone)
                p.grad = None

    def first(self, fn):
        """fn() run on rank 0 only; its result, or the UsageError it raised, on every rank."""
        if self.size == 1:
            return fn()
        out, error = self._on_main(fn)
        out, error = self._broadcast((out, error))
        if error is not None:
            raise error
        return out

    def main_first(self, fn):
        """fn() on rank 0, then (once it has finished, since it may write what they read) on
        the others; a UsageError of rank 0's is raised on every rank, before they start."""
        if self.size == 1:
            return fn()
        out, error = self._on_main(fn)
        error = self._broadcast(error)
        if error is not None:
            raise error
        return out if self.main else fn()

    def check_same(self, model: torch.nn.Module, step: int) -> None:
        """Stop, on every rank, unless all start from the same step and the same weights."""
        if self.size == 1:
            return
        checksum = sum(float(p.detach().double().sum()) for p in model.parameters())
        states = self.gather((step, checksum))
        if len(set(states)) > 1:
            seen = ", ".join(f"rank {r}: step {s} checksum {c:.6g}" for r, (s, c) in enumerate(states))
            raise cli.UsageError(f"the ranks do not start from the same state ({seen}): every node must see "
                                 "the same --runs-dir (a shared filesystem) and the same --init")

    def _on_main(self, fn):
        if not self.main:
            return None, None
        try:
            return fn(), None
        except cli.UsageError as e:
            return None, e

    def _broadcast(self, obj):
        box = [obj]
        self._collective("broadcast from rank 0", torch.distributed.broadcast_object_list, box)
        return box[0]

    def _device(self):
        return torch.device("cuda", torch.cuda.current_device()) \
            if torch.distributed.get_backend() == "nccl" else torch.device("cpu")

    def _collective(self, what: str, fn, *args):
        try:
            return fn(*args)
        except RuntimeError as e:   # torch.distributed.DistError is one
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            reason = reason.split("] ", 1)[-1] if reason.startswith("[") else reason   # gloo's source position
            raise RankLost(f"error: rank {self.rank} of {self.size}: the {what} failed ({reason[:200]}): another "
                           "rank died or stalled; its log, or torchrun's report, names it") from None


def exit_process(code: int):
    """End the process with status `code`: under torchrun without the interpreter's teardown
    (see the module's docstring), else as sys.exit does."""
    if world_size_from_env() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def launch(device: str, timeout: float):
    """The World this process belongs to: World(0, 1) without torchrun, else a process group
    (nccl on CUDA, gloo otherwise) whose collectives give up after `timeout` seconds."""
    cli.check(timeout > 0, f"--dist-timeout {timeout}: must be > 0 seconds")
    size = world_size_from_env()
    if size == 1:
        yield World()
        return
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.device(device).type == "cuda"
    cli.check(not cuda or torch.device(device).index is None,
              f"--device {device} under torchrun: pass --device cuda, each rank takes cuda:LOCAL_RANK")
    if cuda:
        torch.cuda.set_device(local_rank)   # so that "cuda" means this rank's device everywhere

    def stopped(signum, frame):
        raise RankLost(f"error: rank {rank} of {size}: stopped by SIGTERM (torchrun stops every rank when one "
                       "fails; its report names the one that failed first)")
    previous = signal.signal(signal.SIGTERM, stopped)
    try:
        torch.distributed.init_process_group("nccl" if cuda else "gloo",
                                             timeout=datetime.timedelta(seconds=timeout))
    except RuntimeError as e:
        signal.signal(signal.SIGTERM, previous)
        raise RankLost(f"error: rank {rank} of {size}: cannot join the process group: "
                       f"{str(e).strip().splitlines()[0][:300]}") from None
    world = World(rank, size)
    try:
        yield world
        # every rank waits for the last to finish its run, so none tears the group down while
        # another still exchanges (a broadcast's source may return before its data is read)
        world._collective("final barrier", torch.distributed.barrier)
        torch.distributed.destroy_process_group()
    finally:
        signal.signal(signal.SIGTERM, previous)
