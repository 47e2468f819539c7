"""Stage ``distill``: train the student on the teacher, one readable loop.

    check every phase's LR-multiplier rules against the student (errors before anything runs)
    for each training phase (params.yaml's ``stages``: freeze, then unfreeze, ...):
        parameter groups from the regex multipliers (0 freezes), a fresh AdamW, its own warmup
        for each optimizer step:
            set each group's LR from the schedule
            accumulate micro-batches: forward (bf16 autocast if asked), chunked CE + KD loss, backward
            skip the step if the loss or gradient is not finite (stop after N in a row); clip; step
            log; evaluate (and let a sweep prune); checkpoint
    final evaluation, model, final checkpoint, metrics

Outputs: the student (``models/student``, save_pretrained), ``metrics/distill.json``,
``plots/distill/{train,eval}.csv``, TensorBoard events in the run directory and checkpoints
(``checkpoints/distill/last``). The run ends in one of the states ``complete``, ``pruned``
(an ``eval_hook`` asked to stop) or ``stopped_nonfinite`` (then a :class:`UserError` follows
the metrics). Every input is an argument of :func:`main`: ``kdsweep distill`` passes its
options (``--run-dir``, ``--checkpoint-dir``, ``--hparam-keys``, ``--trial``), which a sweep
sets through their environment variables.

Under ``torchrun --nproc_per_node N -m kdsweep.cli distill`` the same loop runs on N ranks
(:mod:`kdsweep.distributed`): each micro-batch holds ``per_device_train_batch_size x N``
sequences, each rank runs its part, and the losses, gradients, evaluations and stop decisions
are those of one process on that global batch. Rank 0 alone writes files and reports to a sweep.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import psutil
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from kdsweep import checkpoint, distributed
from kdsweep.cache.fingerprint import expected_fingerprint
from kdsweep.cache.reader import TeacherLogitCache
from kdsweep.compress import load_student
from kdsweep.config import LossConfig, LRMultiplier, Params, TrainingConfig
from kdsweep.data import load_prepared
from kdsweep.dotted import get_or
from kdsweep.errors import UserError
from kdsweep.fsio import write_json, write_text
from kdsweep.losses import LossSpec, kd_position_count
from kdsweep.models import default_device, load_teacher
from kdsweep.param_groups import GroupAssignment, assign_groups, build_param_groups, format_assignment
from kdsweep.schedule import lr_factor
from kdsweep.student_metrics import evaluate
from kdsweep.teacher_targets import batch_to_tensors, cached_teacher_fn, live_teacher_fn, validation_batches

# Called after every evaluation with (global step, metrics); returning True stops the run
# (a sweep's pruner). The run then ends with state "pruned".
EvalHook = Callable[[int, dict], bool]


@dataclass
class Phase:
    """One resolved training phase of ``stages.configs`` (a run without ``stages`` has one)."""

    name: str
    steps: int
    rules: list[LRMultiplier]
    default_multiplier: float
    learning_rate: float
    alpha: float
    temperature: float
    warmup_steps: int
    where: str  # the config key of `rules`, for error messages

    def lr_factor(self, step_in_phase: int, tr: TrainingConfig) -> float:
        """The schedule's multiplier of the phase's peak LR at its optimizer step ``step_in_phase``
        (each phase warms up and decays on its own)."""
        return lr_factor(
            step_in_phase,
            warmup_steps=self.warmup_steps,
            total_steps=self.steps,
            kind=tr.lr_scheduler,
            min_ratio=tr.min_lr_ratio,
        )


def resolve_phases(params: Params, micro_batches_per_epoch: int) -> list[Phase]:
    """Phase lengths in optimizer steps, with every optional override filled in."""
    tr, loss = params.training, params.loss

    def steps(epochs: float | None, max_steps: int | None) -> int:
        if max_steps is not None:
            return max_steps
        return max(1, math.ceil(epochs * micro_batches_per_epoch / tr.gradient_accumulation_steps))

    if not params.stages.enabled:
        return [
            Phase(
                "train",
                steps(tr.num_train_epochs, tr.max_steps),
                params.parameter_lr_multipliers,
                tr.default_lr_multiplier,
                tr.learning_rate,
                loss.alpha,
                loss.temperature,
                tr.warmup_steps,
                "parameter_lr_multipliers",
            )
        ]
    return [
        Phase(
            s.stage_name,
            steps(s.num_epochs, s.max_steps),
            params.parameter_lr_multipliers if s.parameter_lr_multipliers is None else s.parameter_lr_multipliers,
            tr.default_lr_multiplier if s.default_lr_multiplier is None else s.default_lr_multiplier,
            s.learning_rate or tr.learning_rate,
            loss.alpha if s.alpha is None else s.alpha,
            s.temperature or loss.temperature,
            tr.warmup_steps if s.warmup_steps is None else s.warmup_steps,
            "parameter_lr_multipliers"
            if s.parameter_lr_multipliers is None
            else f"stages.configs.{i}.parameter_lr_multipliers",
        )
        for i, s in enumerate(params.stages.configs)
    ]


def phase_assignments(student: torch.nn.Module, phases: list[Phase]) -> list[GroupAssignment]:
    """Every phase's parameter groups, checked before anything trains (raises UserError)."""
    named = [(n, p.numel()) for n, p in student.named_parameters()]
    return [
        assign_groups(named, [(r.pattern, r.lr_multiplier) for r in ph.rules], ph.default_multiplier, ph.where)
        for ph in phases
    ]


def _phase_loss(loss: LossConfig, phase: Phase) -> LossSpec:
    """Section ``loss`` with the phase's own alpha and temperature."""
    return LossSpec(
        phase.alpha,
        phase.temperature,
        loss.mode,
        loss.direction,
        loss.scale_by_t2,
        loss.chunk_size,
        loss.jsd_beta,
        kd_fraction=loss.kd_positions.fraction,
    )


def _phase_optimizer(
    student: torch.nn.Module, assignment: GroupAssignment, phase: Phase, tr: TrainingConfig
) -> torch.optim.AdamW:
    """A fresh AdamW over the phase's parameter groups (frozen parameters are left out)."""
    groups = build_param_groups(
        student, assignment, phase.learning_rate, tr.weight_decay, tr.weight_decay_on_norms_biases_embeddings
    )
    return torch.optim.AdamW(groups, lr=phase.learning_rate, betas=(tr.adam_beta1, tr.adam_beta2))


def training_sequences(train: np.ndarray, limit: int | None) -> np.ndarray:
    """The first ``limit`` sequences of the training split (all for None); their indices are the
    cache's, so a prefix reads the same teacher targets (UserError past the split's end)."""
    if limit is None:
        return train
    if limit > len(train):
        raise UserError(
            f"training.train_sequences is {limit}, but the training split holds {len(train)} sequences: "
            f"set it to at most {len(train)}, or null for the whole split"
        )
    return train[:limit]


class MicroBatches(torch.utils.data.Dataset):
    """This rank's part of micro-batch ``m`` of the run, as numpy arrays: a pure function of (seed, m).

    Epoch e visits the training sequences in the order ``permutation(seed, e)``, in global
    micro-batches of ``batch_size`` sequences; so a resumed run sees exactly the batches the
    uninterrupted run would have, and DataLoader workers (each reopening the HDF5 cache)
    produce the same batches as the main process. Of each global micro-batch, rank ``rank`` of
    ``world`` reads only its part (:func:`kdsweep.distributed.part`); ``weight`` is 0 for a
    stand-in part (see there), else 1.
    """

    def __init__(
        self,
        sequences: np.ndarray,
        cache: TeacherLogitCache | None,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
    ):
        self.sequences, self.cache, self.batch_size, self.seed = sequences, cache, batch_size, seed
        self.rank, self.world = rank, world
        self.per_epoch = math.ceil(len(sequences) / batch_size)
        self._perm: tuple[int, np.ndarray] | None = None

    def indices(self, m: int) -> np.ndarray:
        epoch, i = divmod(m, self.per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.sequences)))
        return np.sort(self._perm[1][i * self.batch_size : (i + 1) * self.batch_size])

    def __getitem__(self, m: int) -> dict[str, np.ndarray]:
        idx, weight = distributed.part(self.indices(m), self.rank, self.world)
        batch = self.cache.read(idx) if self.cache is not None else {}
        batch["input_ids"] = self.sequences[idx]
        batch["weight"] = np.float32(weight)
        return batch


class TeacherSource:
    """The teacher side of the run: the checked HDF5 caches, or the live model (eval, no_grad,
    in ``teacher.dtype``)."""

    def __init__(self, params: Params, data, teacher_dir: Path, cache_dir: Path, device: torch.device):
        self.caches: dict[str, TeacherLogitCache | None] = {"train": None, "validation": None}
        self.model = None
        self.top_k, self.vocab = params.teacher.top_k, data.meta["tokenizer"]["vocab_size"]
        if params.teacher.use_cached_logits:
            # The splits' fingerprints differ only in "split": hash the teacher's weights once, not per split.
            expected = expected_fingerprint(data, teacher_dir, params, "train")
            for split in self.caches:
                self.caches[split] = TeacherLogitCache(cache_dir / f"{split}.h5")
                self.caches[split].check_fingerprint({**expected, "split": split})
        else:
            self.model = load_teacher(teacher_dir, params.teacher, device)

    def check_temperatures(self, phases: list[Phase], phased: bool) -> None:
        """Every phase's KD temperature must lie in the range the cache supports (UserError)."""
        if self.caches["train"] is None:
            return
        for i, ph in enumerate(phases):
            key = f"stages.configs.{i}.temperature" if phased else "loss.temperature"
            self.caches["train"].check_temperature(ph.temperature, key)

    def fn(self, batch: dict[str, torch.Tensor], temperature: float, mode: str):
        """``teacher_fn(start, end)`` for one batch (see :func:`kdsweep.losses.distillation_loss`)."""
        if self.model is None:
            return cached_teacher_fn(batch, self.caches["train"].betas, temperature)
        return live_teacher_fn(self.model, batch["input_ids"], temperature, mode, self.top_k, self.vocab)

    def close(self) -> None:
        """Close the cache files."""
        for c in self.caches.values():
            if c is not None:
                c.close()


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer in backward. Non-reentrant, so layers still get gradients
    when the embeddings are frozen (a reentrant checkpoint would silently drop them)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated, or this process's resident memory on a CPU, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return psutil.Process().memory_info().rss / 2**20


@dataclass(frozen=True)
class _Paths:
    prepared: Path
    teacher: Path
    cache: Path
    student_init: Path
    student: Path
    metrics: Path
    plots: Path
    run: Path
    checkpoints: Path


def main(
    params: Params,
    *,
    prepared_dir: Path = Path("data/prepared"),
    teacher_dir: Path = Path("models/teacher"),
    cache_dir: Path = Path("data/teacher_logits"),
    student_dir: Path = Path("models/student_init"),
    out: Path = Path("models/student"),
    metrics_path: Path = Path("metrics/distill.json"),
    plots_dir: Path = Path("plots/distill"),
    run_dir: Path = Path("runs/distill"),
    checkpoint_dir: Path = Path("checkpoints/distill"),
    hparam_keys: Sequence[str] = (),
    resume: bool = False,
    eval_hook: EvalHook | None = None,
) -> dict:
    """Distill the student; returns the metrics written to ``metrics_path``.

    Args:
        run_dir: TensorBoard run directory (a sweep sets one per trial).
        checkpoint_dir: where ``last/`` is saved every ``training.save_steps`` and at the end.
        hparam_keys: dotted params keys added to TensorBoard's HParams tab (a sweep passes the
            keys it samples).
        resume: continue exactly from ``<checkpoint_dir>/last``.
        eval_hook: ``eval_hook(step, metrics)`` runs after every evaluation (on rank 0 only: the
            others get its answer); returning True stops the run with state ``pruned``.

    Raises:
        UserError: a bad LR-multiplier pattern or cache (before anything trains), or
            ``training.max_nonfinite_steps`` non-finite steps in a row (after the metrics,
            with state ``stopped_nonfinite``, are written).
    """
    tr = params.training
    if tr.threads:
        torch.set_num_threads(tr.threads)
    torch.manual_seed(tr.seed)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    if tr.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by deterministic cuBLAS
        torch.use_deterministic_algorithms(True)
    paths = _Paths(
        prepared=Path(prepared_dir),
        teacher=Path(teacher_dir),
        cache=Path(cache_dir),
        student_init=Path(student_dir),
        student=Path(out),
        metrics=Path(metrics_path),
        plots=Path(plots_dir),
        run=Path(run_dir),
        checkpoints=Path(checkpoint_dir),
    )
    try:
        with distributed.process_group():  # torchrun's ranks; nothing in one process
            return _distill(params, paths, list(hparam_keys), resume, eval_hook)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


@dataclass
class _Run:
    """What the loop works on, built and checked by :func:`_setup` before anything trains."""

    params: Params
    device: torch.device
    student: torch.nn.Module
    model: torch.nn.Module  # the student's loss forward, wrapped for the ranks (distributed.wrap, then for_phase)
    phases: list[Phase]
    assignments: list[GroupAssignment]
    teacher: TeacherSource
    train_set: MicroBatches
    validation: np.ndarray
    last_ckpt: Path

    def batches(self, first: int, count: int) -> Iterator[dict[str, np.ndarray]]:
        """Micro-batches ``first .. first + count - 1``, read by the DataLoader's workers (if any)."""
        return iter(
            torch.utils.data.DataLoader(
                self.train_set,
                sampler=range(first, first + count),
                batch_size=None,
                num_workers=self.params.training.dataloader_num_workers,
            )
        )

    def evaluate(self) -> dict:
        """Validation CE, KL to the teacher at T = 1 and top-1 agreement (:func:`kdsweep.student_metrics.evaluate`)."""
        tr = self.params.training
        mode = "dense" if self.teacher.model is not None else "topk_tail"
        spec = LossSpec(alpha=0.0, temperature=1.0, mode=mode, chunk_size=self.params.loss.chunk_size)
        batches = validation_batches(
            self.validation,
            self.teacher.caches["validation"],
            self.params.evaluate.batch_size,
            tr.eval_max_batches,
            self.device,
            lambda idx: distributed.part(idx, distributed.rank(), distributed.world_size()),
        )
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=tr.bf16):
            metrics = evaluate(
                self.student,
                batches,
                lambda b: self.teacher.fn(b, 1.0, mode),
                spec,
                forward=self.model,
                reduce=lambda sums: distributed.sum_over_ranks(sums, self.device),
            )
        distributed.reshard(self.model)
        return metrics


def _setup(params: Params, paths: _Paths) -> _Run:
    """Load the data, student and teacher and check the config against them: a pattern that
    matches no parameter, a stale cache or an unsupported temperature stops the run here."""
    tr, world = params.training, distributed.world_size()
    if world > 1 and params.teacher.device_map == "auto" and not params.teacher.use_cached_logits:
        raise UserError(
            "teacher.device_map: auto spreads one live teacher over every visible device, so it cannot run "
            f"in each of the {world} ranks of a torchrun launch; set teacher.use_cached_logits: true "
            "(the cache is made once) or run distill in one process"
        )
    device = default_device()
    data = load_prepared(paths.prepared)
    student = load_student(paths.student_init).to(device)
    student.train()
    if tr.gradient_checkpointing:
        enable_gradient_checkpointing(student)
    global_batch = tr.per_device_train_batch_size * world
    sequences = training_sequences(data.train, tr.train_sequences)
    phases = resolve_phases(params, math.ceil(len(sequences) / global_batch))
    assignments = phase_assignments(
        student, phases
    )  # a pattern that matches nothing stops here, before the teacher loads
    teacher = TeacherSource(params, data, paths.teacher, paths.cache, device)
    teacher.check_temperatures(phases, params.stages.enabled)
    train_set = MicroBatches(sequences, teacher.caches["train"], global_batch, tr.seed, distributed.rank(), world)
    model = distributed.wrap(student, tr.distributed)
    return _Run(
        params,
        device,
        student,
        model,
        phases,
        assignments,
        teacher,
        train_set,
        data.validation,
        paths.checkpoints / "last",
    )


def _start_state(last_ckpt: Path, params: Params, resume: bool) -> checkpoint.TrainingState:
    """Where the run starts: step 0, or (``resume``) where the checkpoint ``last_ckpt`` left it."""
    if not resume:
        return checkpoint.TrainingState()
    if not last_ckpt.exists():
        raise UserError(f"--resume: no checkpoint at {last_ckpt}; run without --resume to start fresh")
    state = checkpoint.load_state(last_ckpt)
    changed = checkpoint.changed_params(last_ckpt, params.model_dump(mode="json"))
    if distributed.is_main():
        print(
            f"distill: resuming from {last_ckpt} at step {state.global_step}"
            + (f"; warning: params changed since the checkpoint: {', '.join(changed)}" if changed else "")
        )
    return state


def _distill(params: Params, paths: _Paths, hparam_keys: list[str], resume: bool, eval_hook: EvalHook | None) -> dict:
    started_at = psutil.Process().create_time()  # this process's start: imports and loading count as startup
    run = _setup(params, paths)
    state = _start_state(run.last_ckpt, params, resume)
    resumed_from = state.global_step if resume else None
    log = _RunLog(paths.run, paths.plots, run.device, resumed_from) if distributed.is_main() else _Silent()
    startup_seconds, start = time.time() - started_at, time.perf_counter()
    last_eval, initial_val_loss = {}, None
    if state.global_step == 0:
        last_eval = run.evaluate()
        initial_val_loss = last_eval["val_loss"]
        log.eval(0, last_eval)
    restore_at = state.phase_index if resume else None  # the checkpoint's phase gets its optimizer back
    status, optimizer, last_eval = _fit(run, log, state, restore_at, eval_hook, last_eval)
    if not last_eval or status == "stopped_nonfinite":
        last_eval = run.evaluate()

    train_seconds, save_start = time.perf_counter() - start, time.perf_counter()
    # persist: true outputs: a crash never leaves a half-written student where DVC would pick it up.
    checkpoint.save_model(run.student, paths.student)
    # Nothing continues a sweep trial (a pruned one is never resumed, a finished one is selected or
    # dropped): its final checkpoint leaves the moments out. A plain run keeps them, so that
    # `--resume` after raising training.max_steps trains on with the same optimizer.
    resumable = eval_hook is None
    params_dict = params.model_dump(mode="json")
    checkpoint.save(run.last_ckpt, run.student, optimizer if resumable else None, state, params_dict, status=status)
    # Where the process's time went, for the sweep runner (which reads this file, not the console).
    seconds = {
        "startup": round(startup_seconds, 2),
        "train": round(train_seconds, 2),
        "save": round(time.perf_counter() - save_start, 2),
    }
    metrics = _finite_or_none(
        {
            "state": status,
            **{k: v for k, v in last_eval.items() if k != "val_tokens"},
            "best_val_loss": _best(state.best_val_loss, last_eval["val_loss"]),
            "steps": state.global_step,
            "nonfinite_steps": state.nonfinite_total,
            "train_seconds": round(train_seconds, 1),
            "initial_val_loss": initial_val_loss,
            "started_at": round(started_at, 3),
            "seconds": seconds,
        }
    )
    if distributed.is_main():
        write_json(paths.metrics, metrics)
    log.close(params, metrics, hparam_keys)
    run.teacher.close()
    if status == "stopped_nonfinite":
        raise UserError(
            f"distill: stopped after {params.training.max_nonfinite_steps} non-finite losses in a row "
            f"(step {state.global_step}, state 'stopped_nonfinite' in {paths.metrics}); "
            "lower training.learning_rate or loss.temperature, keep training.max_grad_norm"
        )
    return metrics


def _enter_phase(run: _Run, assignment: GroupAssignment, phase: Phase, restore: bool) -> torch.optim.AdamW:
    """A phase's start: its parameter groups (which freeze what the phase freezes) and a fresh
    AdamW, the checkpoint's state in it when ``restore``; then the model wrapped for the ranks
    over the parameters the phase trains (:func:`kdsweep.distributed.for_phase`)."""
    optimizer = _phase_optimizer(run.student, assignment, phase, run.params.training)
    if restore:
        checkpoint.restore(run.last_ckpt, run.student, optimizer)
    run.model = distributed.for_phase(run.model)
    return optimizer


def _fit(
    run: _Run,
    log: _RunLog,
    state: checkpoint.TrainingState,
    restore_at: int | None,
    eval_hook: EvalHook | None,
    last_eval: dict,
):
    """The training loop, from ``state`` on (updated in place); returns the run's final state
    (``complete``, ``pruned``, ``stopped_nonfinite``), the last optimizer and the last evaluation."""
    tr, student, device = run.params.training, run.student, run.device
    total_steps = sum(ph.steps for ph in run.phases)
    bar = _progress_bar(total_steps, state.global_step)
    status, optimizer, window = "complete", None, _Window()
    if restore_at == len(run.phases):  # the run had finished: nothing left to train
        checkpoint.restore(run.last_ckpt, student, None)
    for phase_index in range(state.phase_index, len(run.phases)):
        phase, assignment = run.phases[phase_index], run.assignments[phase_index]
        spec = _phase_loss(run.params.loss, phase)
        log.phase(phase_index, run.phases, assignment, state.global_step)
        optimizer = _enter_phase(run, assignment, phase, restore=phase_index == restore_at)
        trainable = [p for g in optimizer.param_groups for p in g["params"]]
        first = state.step_in_phase  # 0 unless resuming inside this phase
        batches = run.batches(state.micro_batch, (phase.steps - first) * tr.gradient_accumulation_steps)

        for step_in_phase in range(first, phase.steps):
            # set each group's LR: the phase's peak x the group's multiplier x the schedule
            factor = phase.lr_factor(step_in_phase, tr)
            for g in optimizer.param_groups:
                g["lr"] = phase.learning_rate * g["lr_multiplier"] * factor

            # forward, loss and backward, micro-batch by micro-batch
            t0 = time.perf_counter()
            micro = [batch_to_tensors(next(batches), device) for _ in range(tr.gradient_accumulation_steps)]
            total, ce, kl, n_tokens = _accumulate(run, micro, phase.temperature, spec)

            # clip and step, unless the loss or the gradient is not finite (the same on every rank:
            # the loss is summed over the ranks, the gradient reduced before its norm is taken)
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, tr.max_grad_norm or float("inf"))
            grad_norm = distributed.full_tensor(grad_norm).item()
            if math.isfinite(total) and math.isfinite(grad_norm):
                optimizer.step()
                state.nonfinite_run = 0
                window.add(total, ce, kl)
            else:  # skipped: no update, Adam's moments untouched
                _count_nonfinite(state, total, grad_norm)
            optimizer.zero_grad(set_to_none=True)
            state.advance(step_in_phase, tr.gradient_accumulation_steps)
            window.tokens, window.seconds = window.tokens + n_tokens, window.seconds + time.perf_counter() - t0
            step = state.global_step
            bar.update(1)
            bar.set_postfix(loss=f"{total:.3f}")
            if state.nonfinite_run >= tr.max_nonfinite_steps:
                status = "stopped_nonfinite"
                break

            # log, evaluate (where a sweep's pruner may stop the run), checkpoint
            if step % tr.logging_steps == 0 or step == total_steps:
                log.train(step, window, grad_norm, optimizer, state.nonfinite_total)
                window = _Window()
            if step % tr.eval_steps == 0 or step == total_steps:
                last_eval = run.evaluate()
                state.best_val_loss = _best(state.best_val_loss, last_eval["val_loss"])
                log.eval(step, last_eval)
                stop = eval_hook is not None and eval_hook(step, last_eval)  # rank 0's hook; the others get its word
                if distributed.broadcast_flag(stop, device):
                    status = "pruned"
                    break
            if tr.save_steps and step % tr.save_steps == 0:
                params_dict = run.params.model_dump(mode="json")
                checkpoint.save(run.last_ckpt, student, optimizer, state, params_dict, phase_name=phase.name)
        if status != "complete":
            break
        state.next_phase()
    bar.close()
    return status, optimizer, last_eval


def _progress_bar(total_steps: int, initial: int) -> tqdm:
    """The run's progress bar, on rank 0 only."""
    return tqdm(
        total=total_steps,
        initial=initial,
        desc="distill",
        unit="step",
        dynamic_ncols=True,
        disable=not distributed.is_main(),
    )


def _accumulate(
    run: _Run, micro: list[dict[str, torch.Tensor]], temperature: float, spec: LossSpec
) -> tuple[float, float, float, int]:
    """Forward and backward of one optimizer step's micro-batches (this rank's parts of them);
    returns the step's loss, CE and KL over the whole global batch and its real-token count.

    ``batchmean``: every part divides its token sums by the real-token count ``n`` of the whole
    accumulated global batch, so the gradients add up to d(sum over all tokens) / n. The
    reduction over ranks averages, which the factor ``world`` undoes (exactly 1 in one process).
    With ``loss.kd_positions.fraction`` f < 1 the KD sums cover ``n_kd`` selected positions (known
    from the sequences' lengths), and ``kd_scale = n / n_kd`` makes the KD term their mean.
    """
    tr, device, world = run.params.training, run.device, distributed.world_size()
    weights = [float(b.pop("weight")) for b in micro]  # 0 for a rank's stand-in part of a short batch
    local_tokens = sum(w * b["input_ids"][:, 1:].numel() for w, b in zip(weights, micro, strict=True))
    local_kd = sum(
        w * len(b["input_ids"]) * kd_position_count(b["input_ids"].shape[1] - 1, spec.kd_fraction)
        for w, b in zip(weights, micro, strict=True)
    )
    n_tokens, n_kd = (int(n) for n in distributed.sum_over_ranks([local_tokens, local_kd], device))
    if spec.kd_fraction < 1:
        spec = replace(spec, kd_scale=n_tokens / max(n_kd, 1))
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for i, (b, w) in enumerate(zip(micro, weights, strict=True)):
        with distributed.gradient_sync(run.model, last_micro_batch=i == len(micro) - 1):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=tr.bf16):
                out = run.model(b["input_ids"], run.teacher.fn(b, temperature, spec.mode), spec)
            loss = out.total(n_tokens) * w
            (loss * world).backward()
        sums += torch.stack([loss.detach(), out.ce_sum / n_tokens * w, out.kl_sum / max(n_kd, 1) * w]).double()
    total, ce, kl = distributed.all_reduce_sum(sums).tolist()
    return total, ce, kl, n_tokens


def _count_nonfinite(state: checkpoint.TrainingState, total: float, grad_norm: float) -> None:
    state.nonfinite_run += 1
    state.nonfinite_total += 1
    if not distributed.is_main():
        return
    tqdm.write(
        f"Step {state.global_step + 1}: non-finite loss ({total}) or gradient norm "
        f"({grad_norm}); step skipped ({state.nonfinite_run} in a row)"
    )


def _best(*val_losses: float | None) -> float | None:
    """The lowest finite validation loss, or None."""
    return min((v for v in val_losses if v is not None and math.isfinite(v)), default=None)


def _finite_or_none(metrics: dict) -> dict:
    """NaN and inf become null, so the file stays strict JSON (DVC and other readers)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}


@dataclass
class _Window:
    """Sums over the steps since the last log line."""

    loss: float = 0.0
    ce: float = 0.0
    kl: float = 0.0
    finite_steps: int = 0
    tokens: int = 0
    seconds: float = 0.0  # in training steps (data, forward, backward, update), not evaluation

    def add(self, loss: float, ce: float, kl: float) -> None:
        self.loss, self.ce, self.kl, self.finite_steps = (
            self.loss + loss,
            self.ce + ce,
            self.kl + kl,
            self.finite_steps + 1,
        )


def _csv(path: Path, columns: list[str], resumed_from: int | None):
    """A CSV of curves, open for appending; on resume, rows a crashed run wrote after the
    checkpoint are dropped (a run killed before its first flush left an empty file: start it anew)."""
    lines = path.read_text().splitlines() if resumed_from is not None and path.exists() else []
    if lines:
        keep = [lines[0]] + [line for line in lines[1:] if int(line.split(",")[0]) <= resumed_from]
        write_text(path, "".join(line + "\n" for line in keep))
        return path.open("a")
    f = path.open("w")
    f.write(",".join(columns) + "\n")
    f.flush()
    return f


class _Silent:
    """The run log of ranks other than 0: they train and evaluate, rank 0 alone reports."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


class _RunLog:
    """Where the run reports: console lines, TensorBoard (scalars, parameter-group tables,
    HParams) and the CSV curves. ``resumed_from`` (the checkpoint's step, on resume) drops
    what a crashed run wrote after it."""

    def __init__(self, run_dir: Path, plots_dir: Path, device: torch.device, resumed_from: int | None):
        self.device = device
        self.writer = SummaryWriter(str(run_dir), purge_step=None if resumed_from is None else resumed_from + 1)
        plots_dir.mkdir(parents=True, exist_ok=True)
        columns = ["step", "loss", "ce", "kl", "grad_norm", "tokens_per_s"]
        self.train_csv = _csv(plots_dir / "train.csv", columns, resumed_from)
        columns = ["step", "val_loss", "val_kl", "val_top1_agreement"]
        self.eval_csv = _csv(plots_dir / "eval.csv", columns, resumed_from)

    def phase(self, index: int, phases: list[Phase], assignment: GroupAssignment, step: int) -> None:
        """The phase's settings and its parameter-group table: printed, and a TensorBoard text."""
        ph = phases[index]
        table = format_assignment(assignment, ph.learning_rate)
        tqdm.write(
            f"phase {index + 1}/{len(phases)} '{ph.name}': {ph.steps} steps, alpha {ph.alpha}, "
            f"T {ph.temperature}, lr {ph.learning_rate:g}, warmup {ph.warmup_steps}\n{table}"
        )
        self.writer.add_text(f"param_groups/{ph.name}", "    " + table.replace("\n", "\n    "), step)

    def train(self, step: int, window: _Window, grad_norm: float, optimizer, nonfinite_total: int) -> None:
        """Console line, TensorBoard scalars and a CSV row: losses averaged over the finite steps
        since the last log; the LR of each group named by its pattern."""
        n = max(window.finite_steps, 1)
        total, ce, kl = window.loss / n, window.ce / n, window.kl / n
        tps = window.tokens / max(window.seconds, 1e-9)
        tqdm.write(f"Step {step}: Total Loss: {total:.4f}, CE Loss: {ce:.4f}, KL Loss: {kl:.4f}")
        scalars = {"loss": total, "ce": ce, "kl": kl, "grad_norm": grad_norm, "nonfinite_steps": nonfinite_total}
        for name, value in scalars.items():
            self.writer.add_scalar(f"train/{name}", value, step)
        for g in optimizer.param_groups:  # decay / no-decay halves of a pattern share its LR
            self.writer.add_scalar(f"lr/{g['name']}", g["lr"], step)
        self.writer.add_scalar("perf/tokens_per_s", tps, step)
        self.writer.add_scalar("perf/memory_mb", memory_mb(self.device), step)
        self.train_csv.write(f"{step},{total:.6f},{ce:.6f},{kl:.6f},{grad_norm:.6f},{tps:.1f}\n")
        self.train_csv.flush()

    def eval(self, step: int, metrics: dict) -> None:
        """Console line, TensorBoard scalars and a CSV row of one evaluation."""
        tqdm.write(
            f"Step {step}: Val Loss: {metrics['val_loss']:.4f}, Val KL: {metrics['val_kl']:.4f}, "
            f"Top-1 Agreement: {metrics['val_top1_agreement']:.3f}"
        )
        for name in ("val_loss", "val_kl", "val_top1_agreement", "val_perplexity"):
            self.writer.add_scalar(f"eval/{name}", metrics[name], step)
        self.eval_csv.write(
            f"{step},{metrics['val_loss']:.6f},{metrics['val_kl']:.6f},{metrics['val_top1_agreement']:.6f}\n"
        )
        self.eval_csv.flush()

    def close(self, params: Params, metrics: dict, hparam_keys: Sequence[str]) -> None:
        """HParams summaries written into this run's own directory (one row per run in
        TensorBoard), then everything flushed and closed."""
        from torch.utils.tensorboard.summary import hparams

        final = {
            f"hparam/{k}": float(metrics[k])
            for k in ("val_loss", "best_val_loss", "val_kl", "val_top1_agreement")
            if metrics.get(k) is not None
        }
        exp, ssi, sei = hparams(hparams_of(params, hparam_keys), final)
        for summary in (exp, ssi, sei):
            self.writer.file_writer.add_summary(summary)
        for k, v in final.items():
            self.writer.add_scalar(k, v, metrics["steps"])
        self.writer.close()
        self.train_csv.close()
        self.eval_csv.close()


_MISSING = object()


def hparams_of(params: Params, keys: Sequence[str] = ()) -> dict:
    """The swept knobs, flattened for TensorBoard's HParams tab.

    A fixed set (alpha, temperature, mode, LR, the phase layout, every LR multiplier) plus
    every dotted params key in ``keys`` (a sweep passes the keys it samples; blanks and
    surrounding spaces are ignored); values that are not numbers, strings or booleans are
    written as JSON.
    """
    hp = {
        "loss.alpha": params.loss.alpha,
        "loss.temperature": params.loss.temperature,
        "loss.mode": params.loss.mode,
        "loss.direction": params.loss.direction,
        "training.learning_rate": params.training.learning_rate,
        "stages.enabled": params.stages.enabled,
        "stages.layout": "+".join(s.stage_name for s in params.stages.configs) if params.stages.enabled else "single",
    }
    for rule in params.parameter_lr_multipliers:
        hp[f"lr_multiplier[{rule.pattern}]"] = rule.lr_multiplier
    dumped = params.model_dump(mode="json")
    for key in filter(None, (k.strip() for k in keys)):
        value = get_or(dumped, key, _MISSING)
        if value is _MISSING:
            tqdm.write(f"distill: warning: --hparam-keys names {key!r}, which is not a params key; not logged")
            continue
        hp[key] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
    return hp
