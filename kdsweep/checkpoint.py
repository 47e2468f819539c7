"""Training checkpoints: everything needed to continue a run exactly.

A checkpoint directory holds::

    model/              save_pretrained (safetensors)
    optimizer.pt        optimizer state_dict (AdamW moments and step counts of this phase); left
                        out of a sweep trial's final checkpoint, which nothing continues
    rng.pt              torch (and CUDA) RNG states
    trainer_state.json  global step, training phase and step in it, position in the data, counters
    params.yaml         the resolved config the run used

There is no scheduler state to keep: the learning rate is a pure function of (phase, step in
phase) (``kdsweep.schedule``), and so is the data order (``MicroBatches``).

It is written through :func:`kdsweep.fsio.atomic_path`, so a crash mid-save leaves the previous
checkpoint intact. Everything is loaded with ``weights_only=True`` (no pickled code).

Under torchrun every rank calls :func:`save` and :func:`restore`: a sharded (FSDP) model's
weights and optimizer moments are gathered whole, and rank 0 alone writes them, so a checkpoint
is the same files whatever the number of ranks, and any number of ranks (one included) resumes
from it. The RNG states saved are rank 0's.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import yaml

from kdsweep import distributed
from kdsweep.errors import UserError
from kdsweep.fsio import atomic_path


def _whole_weights(model) -> dict | None:
    """The model's whole state dict when it may be sharded over ranks (a collective), else None:
    ``save_pretrained`` then reads the model itself."""
    return distributed.full_state_dict(model) if distributed.world_size() > 1 else None


def save_model(model, directory: Path) -> None:
    """``save_pretrained`` of the whole model into ``directory``, atomically. Under torchrun every
    rank calls it (a sharded model is gathered) and rank 0 writes."""
    weights = _whole_weights(model)
    if distributed.is_main():
        with atomic_path(directory, directory=True) as tmp:
            model.save_pretrained(tmp, state_dict=weights)


@dataclass
class TrainingState:
    """Where a run stands and the counters it carries: a checkpoint's ``trainer_state.json``."""

    global_step: int = 0  # optimizer steps taken, over all phases
    phase_index: int = 0  # the training phase the run is in
    step_in_phase: int = 0  # optimizer steps taken in that phase
    micro_batch: int = 0  # the next micro-batch (``MicroBatches`` index): the position in the data
    nonfinite_total: int = 0  # steps skipped for a non-finite loss or gradient, in all
    nonfinite_run: int = 0  # ... in a row, up to now
    best_val_loss: float | None = None

    def advance(self, step_in_phase: int, micro_batches: int) -> None:
        """One optimizer step taken (or skipped) at ``step_in_phase``, over ``micro_batches`` micro-batches."""
        self.global_step += 1
        self.step_in_phase = step_in_phase + 1
        self.micro_batch += micro_batches

    def next_phase(self) -> None:
        """The phase is over: the next one starts at its step 0."""
        self.phase_index, self.step_in_phase = self.phase_index + 1, 0


def save(path: Path, model, optimizer, state: TrainingState, params_dict: dict, **notes) -> None:
    """Write a checkpoint to ``path`` atomically (``optimizer`` may be None: weights only).
    ``notes`` (the run's status, the phase's name) go into ``trainer_state.json`` for the reader;
    resuming ignores them. Under torchrun every rank calls it and rank 0 writes."""
    weights = _whole_weights(model)
    moments = None if optimizer is None else distributed.full_optimizer_state(optimizer)
    if not distributed.is_main():
        return
    with atomic_path(path, directory=True) as tmp:
        model.save_pretrained(tmp / "model", state_dict=weights)
        if moments is not None:
            torch.save(moments, tmp / "optimizer.pt")
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(asdict(state) | notes, indent=2))
        (tmp / "params.yaml").write_text(yaml.safe_dump(params_dict, sort_keys=False))


# trainer_state.json keys of older checkpoints, which named the training phases stages; they still resume.
_RENAMED = {"stage_index": "phase_index", "step_in_stage": "step_in_phase", "stage_name": "phase_name"}


def load_state(path: Path) -> TrainingState:
    """The training state saved in the checkpoint ``path`` (older checkpoints' keys renamed)."""
    saved = json.loads((path / "trainer_state.json").read_text())
    saved = {_RENAMED.get(k, k): v for k, v in saved.items()}
    return TrainingState(**{f.name: saved[f.name] for f in fields(TrainingState) if f.name in saved})


def changed_params(path: Path, params_dict: dict) -> list[str]:
    """Dotted keys whose value differs between the checkpoint's params.yaml and ``params_dict``."""
    saved = yaml.safe_load((path / "params.yaml").read_text())

    def flat(d, prefix=""):
        if isinstance(d, dict):
            return {k: v for key, value in d.items() for k, v in flat(value, f"{prefix}{key}.").items()}
        return {prefix[:-1]: d}

    a, b = flat(saved), flat(json.loads(json.dumps(params_dict)))
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def restore(path: Path, model, optimizer) -> None:
    """Load weights (in place), optimizer (unless None) and RNG states from a checkpoint directory.
    A sharded model and its optimizer take their own shards of the whole tensors saved."""
    from safetensors.torch import load_file

    weights = {}
    for f in sorted((path / "model").glob("*.safetensors")):
        weights.update(load_file(f))
    missing, unexpected = distributed.load_full_state_dict(model, weights)
    tied = {k for k in missing if "lm_head" in k or "embed" in k}
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"checkpoint {path} does not match the model: missing {missing}, unexpected {unexpected}")
    if optimizer is not None:
        if not (path / "optimizer.pt").is_file():
            raise UserError(
                f"--resume: checkpoint {path} has no optimizer state (the final checkpoint of a sweep trial, "
                "which nothing continues); run without --resume to start fresh"
            )
        whole = torch.load(path / "optimizer.pt", weights_only=True)
        optimizer.load_state_dict(distributed.shard_optimizer_state(whole, optimizer))
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
