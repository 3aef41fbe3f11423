"""Training on several processes started by `torchrun`: the process group, FSDP2 sharding, and
sharded checkpoints through `torch.distributed.checkpoint` (DCP).

`torchrun --nproc_per_node=N dla train ...` runs N processes, one per GPU (NCCL) or N CPU
processes (gloo). Each builds the same initial model (same seed), then shards it: every block is
compiled on its own (`fullgraph=True`, unless `--no-compile`) and `fully_shard`ed, then the root
(embedding, tied head, final norm) is. On CUDA parameters are gathered in bf16 and gradients
reduced in fp32 (`MixedPrecisionPolicy`); on the CPU everything stays in the model's dtype.

Rank `r` of `N` takes rows `[r·B/N, (r+1)·B/N)` of the global batch `batch_at(seed, step)` of
`B = --batch-size` windows. Every rank holds the same number of rows and FSDP averages the
gradients over ranks, so the step is that of one process on the same global batch, up to the
order of floating-point sums; the logged loss is the mean of the ranks' losses, the global mean.

A checkpoint `RUN/checkpoints/step-N/` holds DCP's `.metadata` and one `__R_0.distcp` per rank
beside `config.json` and `state.json`. Every rank writes its shards into a hidden folder; after
all have finished, rank 0 writes the JSON files, flushes, renames the folder into place and only
then points `latest` at it (the protocol of `dla.run.checkpoint`), so a crash leaves `latest`
naming a complete checkpoint. DCP reshards on load (`checkpoint.restore`): a sharded checkpoint
resumes on any number of processes, one plain process included, and `dla eval` reads it. The
run folder must be on a file system that every rank sees (one node, or a shared mount).
"""

from __future__ import annotations

import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from dla.run import checkpoint
from dla.run.device import resolve_device

BACKENDS = ("nccl", "gloo")
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class World:
    """This process's place among the torchrun processes, and the device it trains on."""

    rank: int
    size: int
    local_rank: int
    local_size: int
    backend: str
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rows(self, batch_size: int) -> slice:
        """This rank's rows of a global batch of `batch_size` windows."""
        per = batch_size // self.size
        return slice(self.rank * per, (self.rank + 1) * per)


def is_main_process() -> bool:
    """Rank 0, or a process not started by torchrun: the one that reports errors."""
    return os.environ.get("RANK", "0") == "0"


def quiet_failure(timeout: float = 60.0) -> int:
    """Exit code 2 for a rank other than 0 after a set-up error that every rank meets (rank 0
    reports it). Under torchrun's agent (`TORCHELASTIC_RUN_ID` set) it first waits up to `timeout`
    s to be stopped: the agent stops every worker as soon as one fails, so a quiet rank that exited
    first could have rank 0 stopped before it printed its line; waiting, the quiet ranks are ended
    by rank 0's exit instead. Outside the agent (a test setting the variables) it returns at once."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        time.sleep(timeout)
    return 2


def from_env(*, backend: str | None = None, device: str | None = None, env=None) -> World | None:
    """The torchrun world of this process (`None` for a plain process), checked: raises
    `ValueError` with one line for a set-up that cannot train, before anything is written."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env:
        if backend is not None:
            raise ValueError(f"--dist-backend {backend}: only for runs started by torchrun "
                             f"(WORLD_SIZE is not set)")
        return None
    missing = [name for name in TORCHRUN_VARS if name not in env]
    if missing:
        raise ValueError(f"WORLD_SIZE is set but {missing[0]} is not: start distributed runs with "
                         f"torchrun --nproc_per_node=N")
    try:
        rank, size, local_rank, local_size = (int(env[n]) for n in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                    "LOCAL_WORLD_SIZE"))
    except ValueError:
        raise ValueError("RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE must be integers "
                         "(torchrun sets them)") from None
    if not (size >= 1 and 0 <= rank < size and 0 <= local_rank < local_size):
        raise ValueError(f"inconsistent torchrun variables: RANK={rank} WORLD_SIZE={size} "
                         f"LOCAL_RANK={local_rank} LOCAL_WORLD_SIZE={local_size}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"--dist-backend must be one of {list(BACKENDS)}, got {backend!r}")
    cuda = torch.cuda.is_available()
    if backend == "nccl" and not cuda:
        raise ValueError("--dist-backend nccl needs CUDA GPUs, and this machine has none; "
                         "use --dist-backend gloo to train on CPU processes")
    if device is not None:
        dev = resolve_device(device)
    else:
        dev = torch.device("cuda" if cuda and backend != "gloo" else "cpu")
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if backend == "nccl" and dev.type != "cuda":
        raise ValueError(f"--dist-backend nccl needs --device cuda, got --device {device}")
    if backend == "gloo" and dev.type == "cuda":
        raise ValueError("--dist-backend gloo trains CPU processes: pass --device cpu, or use nccl for GPUs")
    if dev.type == "cuda":
        if dev.index is not None:
            raise ValueError(f"--device {device}: under torchrun pass --device cuda; each process takes the "
                             f"GPU of its LOCAL_RANK")
        count = torch.cuda.device_count()
        if local_size > count:
            raise ValueError(f"torchrun started {local_size} processes on this node, but it has {count} GPU(s); "
                             f"use --nproc_per_node={count} at most")
        dev = torch.device("cuda", local_rank)
    return World(rank, size, local_rank, local_size, backend, dev)


def check_batch(world: World, batch_size: int) -> None:
    if batch_size % world.size:
        raise ValueError(f"--batch-size {batch_size} (the global batch) is not divisible by the world size "
                         f"{world.size} (torchrun processes); choose a multiple of {world.size}")


@contextmanager
def process_group(world: World | None):
    """The default process group of `world` while the block runs (nothing for a plain process)."""
    if world is None:
        yield
        return
    if world.device.type == "cuda":
        torch.cuda.set_device(world.device)
    dist.init_process_group(world.backend, device_id=world.device if world.device.type == "cuda" else None)
    try:
        # every process has passed `plan` (which refuses a non-empty --out) before any writes
        dist.barrier()
        yield
    finally:
        dist.destroy_process_group()


@contextmanager
def main_first(world: World | None):
    """Rank 0 runs the block before the others do (a cache that rank 0 writes and they read)."""
    if world is not None and not world.is_main:
        dist.barrier()
    yield
    if world is not None and world.is_main:
        dist.barrier()


def shard(model: torch.nn.Module, world: World, *, compile: bool) -> torch.nn.Module:
    """Compile each block (before sharding, so FSDP's hooks stay outside the compiled graphs)
    and `fully_shard` it, then the root; returns `model`, its parameters now DTensors."""
    mesh = init_device_mesh(world.device.type, (world.size,))
    if world.device.type == "cuda":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy()
    last = len(model.blocks) - 1
    for i, block in enumerate(model.blocks):
        if compile:
            block.compile(fullgraph=True)
        # the last block's parameters are needed again at once by the backward: keep them gathered
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=i < last)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over the ranks (SUM then divide: gloo has no AVG)."""
    total = value.detach().clone()
    dist.all_reduce(total)
    return total / dist.get_world_size()


def full(value: torch.Tensor) -> torch.Tensor:
    """A DTensor's global value (e.g. the gradient norm of sharded gradients); a plain tensor as is."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def save(run_dir: Path, *, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         config: dict, state: dict) -> Path:
    """Write the sharded checkpoint of `step` (every rank calls this) and return its folder."""
    root = Path(run_dir) / "checkpoints"
    name = f"step-{step:08d}"
    final = root / name
    if checkpoint.read_latest(root) == name:  # already saved: the state at a step is a function of the step
        return final
    tmp = root / f".{name}.tmp"
    main = dist.get_rank() == 0
    if main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp)
    dist.barrier()  # every rank's shards are written
    if main:
        try:
            checkpoint.write_json(tmp / "config.json", config)
            checkpoint.write_json(tmp / "state.json", {**state, "step": step, "world_size": dist.get_world_size()})
            checkpoint.publish(root, tmp, name)
        except BaseException:
            checkpoint.discard_unpublished(root, name)
            raise
    dist.barrier()  # no rank goes on before the checkpoint is published
    return final

