"""One place for distributed start-up and tear-down.

``initialize`` reads the launcher's environment (torchrun, or SLURM's srun with one task per
process), starts torch.distributed (NCCL with CUDA, gloo without), applies the CPU shim when
there is no CUDA, builds megatron-core's parallel groups and seeds every generator.
A single process with no launcher variables is a world of one.
"""

from __future__ import annotations

import datetime
import os
import random
import socket
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_prior import compat


@dataclass(frozen=True)
class LaunchInfo:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun", "slurm" or "single"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _slurm_master_addr() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return "127.0.0.1"
    # "node[01-04,07],other" -> "node01": the first host of a compressed SLURM node list.
    first = nodelist.split(",")[0]
    if "[" in first:
        prefix, rest = first.split("[", 1)
        first = prefix + rest.split("-")[0].split(",")[0].rstrip("]")
    return first


def launch_info() -> LaunchInfo:
    """Where this process sits in the job, from torchrun's or SLURM's environment."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchInfo(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            source="torchrun",
        )
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return LaunchInfo(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR") or _slurm_master_addr(),
            master_port=int(env.get("MASTER_PORT", 29500)),
            source="slurm",
        )
    return LaunchInfo(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT", 0)) or _free_port(), "single")


def device() -> torch.device:
    """The device this rank computes on."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Seed Python, numpy, torch (CPU and CUDA) and megatron-core's model-parallel tracker.

    Megatron's convention: the same seed on every data-parallel rank, offset by the
    pipeline stage so stages initialise differently; the tracker offsets by TP rank.
    """
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def initialize(
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    virtual_pipeline_parallel: Optional[int] = None,
    context_parallel: int = 1,
    seed: int = 1234,
    timeout_minutes: int = 10,
) -> LaunchInfo:
    """Start torch.distributed and megatron-core's parallel state for this process."""
    info = launch_info()
    if info.world_size % (tensor_parallel * pipeline_parallel * context_parallel) != 0:
        raise ValueError(
            f"world size {info.world_size} is not divisible by tensor parallel size "
            f"{tensor_parallel} x pipeline parallel size {pipeline_parallel} x context parallel size {context_parallel}"
        )
    if virtual_pipeline_parallel is not None and pipeline_parallel < 2:
        raise ValueError("virtual pipeline parallelism needs a pipeline parallel size of at least 2")
    compat.apply_cpu_shim()
    compat.apply_no_te_defaults()
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            init_method=f"tcp://{info.master_addr}:{info.master_port}",
            rank=info.rank,
            world_size=info.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        virtual_pipeline_model_parallel_size=virtual_pipeline_parallel,
        context_parallel_size=context_parallel,
    )
    seed_everything(seed)
    return info


def destroy() -> None:
    """Tear down everything ``initialize`` built, so the process can initialise again."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    tensor_parallel.random.initialize_rng_tracker(force_reset=True)
