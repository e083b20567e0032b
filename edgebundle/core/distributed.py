"""Running the prepare stages under `torchrun`: PyTorch's own distributed engine, nothing home-made.

`torchrun --nproc-per-node N -m edgebundle.cli prepare RECIPE -o WORK` starts N processes; each calls
`init_from_env()` (torchrun's documented environment: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT),
which joins the process group -- NCCL on GPUs, gloo on CPUs. Training stages (teacher training and
distillation) then run DistributedDataParallel over a DistributedSampler; every other stage runs on rank
0 only, and only rank 0 writes artifacts, logs and `prepared.json`. The other ranks read the finished
artifacts from the work folder, which must therefore be shared (the same path on every node).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_flag(flag: bool) -> bool:
    """Rank 0's decision, on every rank (so all ranks take the same branch)."""
    if not active():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.broadcast(t, src=0)
    return bool(t.item())


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) if active() else torch.cuda.current_device())
    return torch.device("cpu")


def init_from_env() -> bool:
    """Join torchrun's process group when launched by torchrun with more than one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return active()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", 0))
        check_local_rank(local, torch.cuda.device_count())
        torch.cuda.set_device(local)
    dist.init_process_group(backend=backend)
    return True


def check_local_rank(local_rank: int, gpus: int) -> None:
    """NCCL takes one GPU per process: a local rank beyond the node's GPUs is a launch error, said in one
    line (CUDA's own is an 'invalid device ordinal' traceback from rank 1 while rank 0 is killed)."""
    from edgebundle.core.errors import RecipeError

    if local_rank >= gpus:
        raise RecipeError(f"torchrun started local rank {local_rank} on a node with {gpus} GPU(s): NCCL needs one "
                          f"GPU per process; use --nproc-per-node {gpus} or fewer (or CUDA_VISIBLE_DEVICES= to "
                          "train on the CPUs with gloo)")


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
