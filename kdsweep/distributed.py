"""One distill run over several processes: torchrun, DDP and FSDP2.

Launched as ``torchrun --nproc_per_node N -m kdsweep.cli distill``, each of the N processes
(ranks) trains the same student on its own device (``cuda:LOCAL_RANK`` with NCCL, or the CPU
with Gloo)::

    global micro-batch m = MicroBatches(seed, m): per_device_train_batch_size x N sequences
    rank r runs part r of it (np.array_split, so the parts' union is the global batch)
    n = all_reduce(real target tokens of the accumulated global batch)
    loss_r = (sum of rank r's per-token losses) / n x N
    backward: DDP / FSDP average the gradients over the N ranks, which the x N undoes, so each
        rank steps with d(sum over all tokens) / n: the gradient of one process on the global batch

A rank whose part of a batch is empty (the short last batch of an epoch, fewer sequences
than ranks) runs the batch's first sequence with weight 0: every rank must run the same
forwards and backwards, since their collectives meet.

Without torchrun (no ``WORLD_SIZE`` in the environment) every helper here is the identity on
one process, so ``kdsweep distill`` runs as it always did.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
import torch.distributed as dist

from kdsweep.losses import LossOutput, LossSpec, TeacherFn, student_loss
from kdsweep.models import default_device


def world_size() -> int:
    """Number of ranks of this run (1 outside torchrun)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's contract, read before the group exists


def rank() -> int:
    """This process's rank (0 outside torchrun)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Rank 0: the one process that writes outputs and talks to the sweep."""
    return rank() == 0


@contextmanager
def process_group() -> Iterator[None]:
    """The process group of a torchrun launch, set up on entry (NCCL on CUDA, Gloo on the CPU)
    and torn down on exit; nothing outside torchrun or when the caller made the group."""
    if world_size() == 1 or dist.is_initialized():
        yield
        return
    device = default_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def part(indices: np.ndarray, rank: int, world: int) -> tuple[np.ndarray, float]:
    """Part ``rank`` of ``world`` of a global batch's sequence indices, and its weight: 1, or 0
    for the stand-in (the batch's first sequence) a rank runs when its part is empty."""
    mine = np.array_split(np.asarray(indices), world)[rank]
    return (mine, 1.0) if len(mine) else (np.asarray(indices)[:1], 0.0)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks, in place (returned for chaining)."""
    if world_size() > 1:
        dist.all_reduce(t)
    return t


def sum_over_ranks(values: Sequence[float], device: torch.device) -> list[float]:
    """Each value summed over the ranks (in float64 on ``device``, as the backend needs); the
    values themselves in one process."""
    if world_size() == 1:
        return list(values)
    return all_reduce_sum(torch.tensor(list(values), dtype=torch.float64, device=device)).tolist()


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every rank, so that a decision only rank 0 takes (the pruner's)
    stops all ranks at the same step."""
    if world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


class LossForward(torch.nn.Module):
    """:func:`kdsweep.losses.student_loss` as the forward of a module around the student.

    The chunked loss reads the LM head's weight directly, outside any submodule's forward, so
    the loss has to be the wrapped module's forward: FSDP gathers the root's parameters (head,
    embeddings, final norm) in its forward hook, and DDP prepares its gradient reduction there.
    """

    def __init__(self, student: torch.nn.Module):
        super().__init__()
        self.student = student

    def forward(self, input_ids: torch.Tensor, teacher_fn: TeacherFn, spec: LossSpec) -> LossOutput:
        return student_loss(self.student, input_ids, teacher_fn, spec)


def wrap(student: torch.nn.Module, kind: str) -> torch.nn.Module:
    """The student's :class:`LossForward`, prepared for the ranks (left alone in one process).

    ``fsdp``: FSDP2 ``fully_shard`` on each decoder layer, then on the whole, for students that
    do not fit on one device; frozen parameters are fine (FSDP2 reduces only the gradients that
    exist, the same ones on every rank). ``ddp``: the plain :class:`LossForward` (evaluation
    needs no DDP); each training phase wraps it with :func:`for_phase`.
    """
    model = LossForward(student)
    if world_size() > 1 and kind == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in student.get_decoder().layers:
            fully_shard(layer)
        fully_shard(model)
    return model


def for_phase(model: torch.nn.Module) -> torch.nn.Module:
    """The model a training phase runs, once the phase has set each parameter's ``requires_grad``.

    Under torchrun with DDP: a fresh DistributedDataParallel around the :class:`LossForward`,
    since DDP reduces the gradients of exactly the parameters that required one when it was
    built. Built per phase, it never waits for a frozen parameter, so it needs no
    ``find_unused_parameters`` (and its extra graph traversal and warning each run): every
    trainable parameter of the student gets a gradient from every forward (the experts of a
    layer are 3D tensors, so an expert no token was routed to still belongs to a used one).
    FSDP and one process: ``model`` itself.
    """
    ddp = torch.nn.parallel.DistributedDataParallel
    if world_size() == 1 or _is_fsdp(model):
        return model
    if isinstance(model, ddp):
        model._remove_autograd_hooks()  # the previous phase's reducer must not act on the new phase's gradients
        model = model.module
    device = default_device()
    return ddp(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        forward_sync_buffers=False,  # rotary tables only: the same on every rank, no collective per forward
    )


def _is_fsdp(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def reshard(model: torch.nn.Module) -> None:
    """Free the gathered parameters an FSDP root keeps after a forward without backward (an
    evaluation), so that ``named_parameters()`` gives the sharded ones again: an optimizer built
    on the gathered copies would update tensors the next gather overwrites."""
    if _is_fsdp(model):
        model.reshard()


def gradient_sync(model: torch.nn.Module, last_micro_batch: bool):
    """DDP reduces the gradients only at the last micro-batch of an accumulated step (FSDP
    reduce-scatters at every one, which keeps its gradients sharded)."""
    if not last_micro_batch and isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return nullcontext()


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor of the whole of ``t``: gathered from the ranks' shards if ``t`` is
    sharded (a collective: every rank calls it, in the same order), else ``t`` itself."""
    return t.full_tensor() if _is_dtensor(t) else t


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's whole state dict, unsharded, on the CPU (a collective under FSDP).

    Gathered one tensor at a time, so a device never holds more than one whole tensor.
    """
    return {k: full_tensor(v).detach().cpu() for k, v in model.state_dict().items()}


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with every sharded state tensor gathered whole, on the CPU
    (a collective under FSDP); the same layout as a one-process optimizer's."""
    sd = optimizer.state_dict()
    sd["state"] = {
        i: {k: full_tensor(v).cpu() if torch.is_tensor(v) else v for k, v in s.items()} for i, s in sd["state"].items()
    }
    return sd


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` laid out as ``like``: this rank's shard of it if ``like`` is sharded (each rank
    cuts its own from its whole copy, no communication), else ``full`` on ``like``'s device."""
    if not _is_dtensor(like):
        return full.to(like.device)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def load_full_state_dict(model: torch.nn.Module, weights: dict[str, torch.Tensor]):
    """Load whole tensors (a checkpoint) into a model whose parameters may be sharded; returns
    ``load_state_dict``'s missing and unexpected keys (not strict)."""
    if not any(_is_dtensor(p) for p in model.parameters()):
        return model.load_state_dict(weights, strict=False)
    own = model.state_dict()
    return model.load_state_dict(
        {k: shard_like(v, own[k]) if k in own else v for k, v in weights.items()}, strict=False
    )


def shard_optimizer_state(sd: dict, optimizer: torch.optim.Optimizer) -> dict:
    """A whole optimizer state dict (:func:`full_optimizer_state`) cut to the shards of the
    optimizer's parameters, ready for ``optimizer.load_state_dict``."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {
        i: {k: shard_like(v, params[int(i)]) if torch.is_tensor(v) and v.dim() else v for k, v in s.items()}
        for i, s in sd["state"].items()
    }
    return {**sd, "state": state}
