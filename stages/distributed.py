"""Data parallelism shared by herd's trainers (pretraining and SFT, reward models, DPO) under torchrun.

The launcher (``tasks/torchrun_stage.py``, ``tasks/torchrun_pretrain.py``) starts the processes and initialises
``torch.distributed``; a trainer asks :meth:`Processes.current` for its rank, the world size and the parallelism:

* ``ddp``: every process holds the whole model and gradients are averaged over the processes
  (``DistributedDataParallel``);
* ``fsdp``: FSDP2 (``fully_shard``) per decoder layer, then the root: parameters, gradients and optimizer state
  sharded over the processes; with bf16, bf16 compute parameters and fp32 gradient reduction.

A global batch is cut into per-rank slices (:meth:`Processes.micro_batches`) and each piece's loss scaled by the
world size (both parallelisms average gradients), so N processes take exactly the optimizer step one process takes.
Checkpoints and final models are written from whole weights (:class:`Unsharded`), and optimizer state is keyed by
parameter name (:func:`optim_state`): a checkpoint resumes under any process count and either parallelism.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import torch

from stages.errors import ConfigError

T = TypeVar("T")


def process_group():
    """``torch.distributed`` when a process group is initialised (a torchrun launch), else None."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


class Piece(NamedTuple):
    """One micro-batch of a rank. ``weight``: its real items times the world size, 0 for a filler piece, so
    ``loss * weight / len(batch)`` backpropagates its share of the global batch mean."""

    items: list
    weight: int


@dataclass(frozen=True)
class Processes:
    """Where this process stands in a (torchrun) launch: one process with no group, or ``rank`` of ``world_size``."""

    dist: Any = None
    rank: int = 0
    world_size: int = 1
    fsdp: bool = False

    @classmethod
    def current(cls, parallelism: str = "ddp", *, fix: str = "launch it with nproc 2 or more, or parallelism: ddp"
                ) -> Processes:
        """This process's place; ``parallelism: fsdp`` without a process group is a ConfigError ending in ``fix``
        (the fields to change)."""
        dist = process_group()
        fsdp = parallelism == "fsdp"
        if fsdp and dist is None:
            raise ConfigError("parallelism: fsdp shards the model over the processes of a torchrun launch, and this "
                              f"run has none: {fix}")
        if dist is None:
            return cls()
        return cls(dist, dist.get_rank(), dist.get_world_size(), fsdp)

    def micro_batches(self, batch: Sequence[T], micro: int) -> list[Piece]:
        """This rank's pieces of a global ``batch``: its contiguous slice (``ceil(len / world_size)`` items; the
        last ranks' may be shorter or empty) cut into pieces of ``micro`` items. Every rank gets as many pieces (the
        longest slice's count) so that collectives line up (FSDP all-gathers, DDP reductions): a rank whose slice
        has run out takes the batch's first item with weight 0. One process: ``batch`` in ``micro`` pieces."""
        n = len(batch)
        per = -(-n // self.world_size)
        mine = list(batch[self.rank * per:(self.rank + 1) * per])
        out = []
        for i in range(-(-per // micro)):
            items = mine[i * micro:(i + 1) * micro]
            out.append(Piece(items, len(items) * self.world_size) if items else Piece([batch[0]], 0))
        return out

    def sync(self, model, last: bool):
        """Context of one micro-batch's backward: gradients are reduced over the processes on the ``last`` only
        (DDP: ``no_sync`` before it; FSDP: one reduce-scatter). ``model``: the DDP wrapper or the sharded root."""
        if self.fsdp:
            model.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        if self.dist is None or last:
            return contextlib.nullcontext()
        return model.no_sync()

    def sum(self, values: Sequence[float], device: torch.device) -> list[float]:
        """``values`` summed over the processes (as they are with one)."""
        if self.dist is None:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64, device=device)
        self.dist.all_reduce(t)
        return t.tolist()

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every process (a picklable value)."""
        if self.dist is None:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.dist is not None:
            self.dist.barrier()

    def prepare(self, model: torch.nn.Module, device: torch.device, *, bf16: bool,
                activation_checkpointing: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
        """``(model, forward)``: ``model`` (on ``device``) with activation checkpointing when asked, sharded under
        FSDP; ``forward`` is what a training step calls (the DDP wrapper under DDP, else ``model``). The optimizer
        takes ``model.parameters()`` (sharded ones under FSDP)."""
        if activation_checkpointing:
            enable_activation_checkpointing(model)
        if self.fsdp:
            shard(model, bf16)
            return model, model
        if self.dist is not None:
            from torch.nn.parallel import DistributedDataParallel as DDP

            return model, DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        return model, model


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations in the backward (non-reentrant checkpoints)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the older name before
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def shard(model: torch.nn.Module, bf16: bool) -> None:
    """FSDP2: each decoder layer its own unit (all-gathered for its forward and backward, then freed), the root
    holding the embeddings, final norm and head; with bf16, bf16 compute parameters and fp32 gradient reduction.
    ``model``: a Hugging Face Llama (``model.model.layers``: causal LM or sequence classifier)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)


def clip_grad_norm(parameters, max_norm: float) -> float:
    """Clip the global gradient norm to ``max_norm`` (0: no clipping); the norm before clipping (whole, under FSDP)."""
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm or float("inf"))
    return (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()


class Unsharded:
    """The trained model with all its weights on one process, for checkpoints, the final save and evaluation: the
    model itself without FSDP (every rank); under FSDP a collective (every rank calls it) that gathers the shards
    into rank 0's copy (``make()`` builds it once, on the device it should run on) and gives None elsewhere."""

    def __init__(self, model: torch.nn.Module, procs: Processes, make: Callable[[], torch.nn.Module]):
        self.model, self.procs, self.make = model, procs, make
        self.copy: torch.nn.Module | None = None

    def __call__(self) -> torch.nn.Module | None:
        if not self.procs.fsdp:
            return self.model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.procs.rank != 0:
            return None
        if self.copy is None:
            self.copy = self.make()
        self.copy.load_state_dict(sd)
        return self.copy


def _param_names(optimizer, model) -> list[str]:
    """The fully qualified name of every optimizer parameter, in the optimizer's (state dict index) order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def optim_state(optimizer, model, fsdp: bool) -> dict:
    """The optimizer's whole (unsharded) state keyed by parameter name, as ``torch.distributed.checkpoint``'s full
    optimizer state dict is. Under FSDP a collective (every rank calls it); the state lands on rank 0 only."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    sd, names = optimizer.state_dict(), _param_names(optimizer, model)
    return {"state": {names[i]: v for i, v in sd["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]}


def load_optim_state(optimizer, model, sd: dict, fsdp: bool) -> None:
    """Load :func:`optim_state`'s format (or an older checkpoint's index-keyed one) into a plain or sharded
    optimizer."""
    groups = sd["param_groups"]
    if any(isinstance(i, int) for g in groups for i in g["params"]):  # written before names: the same layout
        optimizer.load_state_dict(sd)
        return
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, sd, options=StateDictOptions(full_state_dict=True))
        return
    index = {n: i for i, n in enumerate(_param_names(optimizer, model))}
    optimizer.load_state_dict({"state": {index[n]: v for n, v in sd["state"].items()},
                               "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in groups]})


# ---------------------------------------------------------------------------------------------- config checks


def check_train_processes(nproc: int, train) -> None:
    """A section that runs a ``PretrainConfig`` trainer (``train``: pretraining, SFT) on ``nproc`` processes: FSDP
    needs two or more, and every process takes whole micro-batches of the global batch. ValueError naming the
    fields (pydantic reports it under the section)."""
    if train.parallelism == "fsdp" and nproc == 1:
        raise ValueError("train.parallelism 'fsdp' shards the model over several processes: set nproc to 2 or more, "
                         "or train.parallelism to 'ddp'")
    per_rank = train.sequences_per_batch / (nproc * train.micro_batch_size)
    if nproc > 1 and (per_rank < 1 or per_rank != int(per_rank)):
        raise ValueError(f"nproc {nproc} x train.micro_batch_size {train.micro_batch_size} must divide the global "
                         f"batch of {train.sequences_per_batch} sequences (train.batch_tokens / train.seq_len): "
                         "change nproc, micro_batch_size or batch_tokens")


def check_pair_processes(nproc: int, parallelism: str, batch_pairs: int, prefix: str = "") -> None:
    """A pair trainer (reward model, DPO) on ``nproc`` processes: FSDP needs two or more, and every process needs
    a pair of each step. ``prefix``: where the trainer's fields sit in the section (``helpfulness.``)."""
    if parallelism == "fsdp" and nproc == 1:
        raise ValueError(f"{prefix}parallelism 'fsdp' shards the model over several processes: set nproc to 2 or "
                         f"more, or {prefix}parallelism to 'ddp'")
    if nproc > batch_pairs:
        raise ValueError(f"nproc {nproc} exceeds {prefix}batch_pairs {batch_pairs}: every process needs at least "
                         "one pair per step; lower nproc or raise batch_pairs")
