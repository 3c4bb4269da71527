"""Distributed fine-tuning plumbing for runs launched by ``torchrun`` (PyTorch DDP).

torchrun starts one process per rank and sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` (and
the rendezvous address); every rank runs the same command. What is distributed is the
fine-tune only: each rank plans and fits on its own (deterministic and cheap next to the
fine-tune, and it needs no model shipped between processes), the fine-tune starts from
rank 0's student (broadcast), splits each global batch across ranks and all-reduces the
gradients. Rank 0 alone takes the output lock, writes checkpoints and outputs, and prints.

Collectives time out after ``HFB_DIST_TIMEOUT`` seconds (default 600): a rank that dies
or hangs stops the others within that bound, with one line each, never an endless wait.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
from collections.abc import Iterator

import torch
import torch.distributed as dist

from .errors import ConfigError, HfbError, InputError

DEFAULT_TIMEOUT_S = 600.0


class DistributedFailure(HfbError):
    """Another rank died, hung past the timeout, or the job was stopped by torchrun.
    Exit 1; the last checkpoint (written by rank 0) stays resumable."""

    exit_code = 1


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise InputError(f"environment variable {name}={os.environ[name]!r} is not an "
                         "integer (set by torchrun)") from None


def is_distributed() -> bool:
    """Launched by torchrun (or alike) with more than one process."""
    return "RANK" in os.environ and _env_int("WORLD_SIZE", 1) > 1


def active() -> bool:
    """A process group of more than one rank is initialized in this process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else _env_int("RANK", 0) if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else \
        _env_int("WORLD_SIZE", 1) if is_distributed() else 1


def local_rank() -> int:
    return _env_int("LOCAL_RANK", 0) if is_distributed() else 0


def is_main() -> bool:
    """Rank 0 (or not distributed): the process that writes and prints."""
    return rank() == 0


def timeout_s() -> float:
    raw = os.environ.get("HFB_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_S))
    try:
        t = float(raw)
    except ValueError:
        t = -1.0
    if not t > 0:
        raise InputError(f"HFB_DIST_TIMEOUT={raw!r}: expected seconds > 0")
    return t


def device_for(device: str) -> torch.device:
    """Each rank's device: ``cuda:LOCAL_RANK`` for CUDA under torchrun, else ``device``."""
    if device.startswith("cuda") and is_distributed():
        return torch.device("cuda", local_rank())
    return torch.device(device)


def init(device: str = "cpu") -> bool:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA); False (and
    nothing done) when not launched distributed."""
    if not is_distributed() or active():
        return False
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s()))
    except (RuntimeError, ValueError) as exc:
        raise DistributedFailure(f"rank {rank()}: could not join the torchrun process group "
                                 f"({_first_line(exc)})") from None
    return True


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


@contextlib.contextmanager
def session(device: str = "cpu") -> Iterator[bool]:
    """Process group for the block when launched by torchrun; yields whether it is.

    torchrun stops the surviving ranks with SIGTERM when one fails: that becomes a
    :class:`DistributedFailure` (one line) instead of a silent death."""
    started = init(device)
    old = None
    if started:
        def stopped(signum, _frame):
            raise DistributedFailure(f"rank {rank()}: stopped by torchrun (another rank "
                                     "failed); the last fine-tuning checkpoint, if any, is "
                                     "kept: rerun with {resume}", resume="resume=True")
        old = signal.signal(signal.SIGTERM, stopped)
    try:
        yield started
    finally:
        if started:
            signal.signal(signal.SIGTERM, old)
            cleanup()


def check_batch(global_batch: int) -> int:
    """The per-rank batch; refuses a world size that does not divide the global batch."""
    w = world_size()
    if global_batch % w:
        raise ConfigError("batch_size", global_batch, f"is the global batch and must be a "
                          f"multiple of the {w} processes torchrun started (e.g. "
                          f"{max(w, global_batch - global_batch % w)})")
    return global_batch // w


@contextlib.contextmanager
def collective(what: str) -> Iterator[None]:
    """Turn a failed or timed-out collective into one line naming the cause."""
    try:
        yield
    except DistributedFailure:
        raise
    except (RuntimeError, dist.DistError) as exc:
        raise DistributedFailure(f"rank {rank()}: {what} failed: another rank stopped, or "
                                 f"did not answer within {timeout_s():g} s "
                                 f"({_first_line(exc)}); the last fine-tuning checkpoint, "
                                 "if any, is kept: rerun with {resume}",
                                 resume="resume=True") from None


def broadcast_state(module: torch.nn.Module) -> None:
    """Every rank takes rank 0's parameters and buffers (the student it planned/fitted)."""
    if not active():
        return
    with collective("broadcasting rank 0's model"), torch.no_grad():
        for t in module.state_dict().values():
            dist.broadcast(t, src=0)


def broadcast_floats(values: list[float], device: torch.device) -> list[float]:
    """Rank 0's ``values`` on every rank (e.g. its held-apart KL: one decision for all)."""
    if not active():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    with collective("broadcasting rank 0's evaluation"):
        dist.broadcast(t, src=0)
    return t.tolist()


def all_sum(t: torch.Tensor, what: str) -> torch.Tensor:
    """Sum of ``t`` over ranks (in place, detached); ``t`` itself without a group."""
    if active():
        with collective(what):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
