"""Stage ``distill``: train the student on the teacher, one readable loop.

    check every stage's LR-multiplier rules against the student (errors before anything runs)
    for each stage (freeze, then unfreeze, ...):
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
the metrics). Environment: ``KDSWEEP_RUN_DIR`` and ``KDSWEEP_CHECKPOINT_DIR`` move the
TensorBoard and checkpoint directories; ``KDSWEEP_HPARAM_KEYS`` (comma-separated dotted
params keys) adds keys to the HParams tab.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from kdsweep import checkpoint
from kdsweep.cache import TeacherLogitCache
from kdsweep.config import LRMultiplier, Params
from kdsweep.data import load_prepared
from kdsweep.errors import UserError
from kdsweep.evaluation import evaluate
from kdsweep.losses import LossSpec, student_loss
from kdsweep.models import default_device, load_causal_lm, load_teacher
from kdsweep.param_groups import Plan, build_param_groups, format_plan, plan_groups
from kdsweep.schedule import lr_factor
from kdsweep.stages.teacher_logits import expected_fingerprint
from kdsweep.teachers import batch_to_tensors, cached_teacher_fn, live_teacher_fn

# Called after every evaluation with (global step, metrics); returning True stops the run
# (a sweep's pruner). The run then ends with state "pruned".
EvalHook = Callable[[int, dict], bool]


@dataclass
class Stage:
    """One resolved entry of the stage layout (a run without ``stages`` has one)."""

    name: str
    steps: int
    rules: list[LRMultiplier]
    default_multiplier: float
    learning_rate: float
    alpha: float
    temperature: float
    warmup_steps: int
    where: str  # the config key of `rules`, for error messages


def resolve_stages(params: Params, micro_batches_per_epoch: int) -> list[Stage]:
    """Stage lengths in optimizer steps, with every optional override filled in."""
    tr, loss = params.training, params.loss

    def steps(epochs: float | None, max_steps: int | None) -> int:
        if max_steps is not None:
            return max_steps
        return max(1, math.ceil(epochs * micro_batches_per_epoch / tr.gradient_accumulation_steps))

    if not params.stages.enabled:
        return [
            Stage(
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
        Stage(
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


def plan_stages(student: torch.nn.Module, stages: list[Stage]) -> list[Plan]:
    """Every stage's parameter groups, checked before anything trains (raises UserError)."""
    named = [(n, p.numel()) for n, p in student.named_parameters()]
    return [
        plan_groups(named, [(r.pattern, r.lr_multiplier) for r in st.rules], st.default_multiplier, st.where)
        for st in stages
    ]


class MicroBatches(torch.utils.data.Dataset):
    """Micro-batch ``m`` of the run, as numpy arrays: a pure function of (seed, m).

    Epoch e visits the training sequences in the order ``permutation(seed, e)``; so a
    resumed run sees exactly the batches the uninterrupted run would have, and DataLoader
    workers (each reopening the HDF5 cache) produce the same batches as the main process.
    """

    def __init__(self, sequences: np.ndarray, cache: TeacherLogitCache | None, batch_size: int, seed: int):
        self.sequences, self.cache, self.batch_size, self.seed = sequences, cache, batch_size, seed
        self.per_epoch = math.ceil(len(sequences) / batch_size)
        self._perm: tuple[int, np.ndarray] | None = None

    def indices(self, m: int) -> np.ndarray:
        epoch, i = divmod(m, self.per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.sequences)))
        return np.sort(self._perm[1][i * self.batch_size : (i + 1) * self.batch_size])

    def __getitem__(self, m: int) -> dict[str, np.ndarray]:
        idx = self.indices(m)
        batch = self.cache.read(idx) if self.cache is not None else {}
        batch["input_ids"] = self.sequences[idx]
        return batch


def validation_batches(
    sequences: np.ndarray,
    cache: TeacherLogitCache | None,
    batch_size: int,
    max_batches: int | None,
    device: torch.device,
):
    n = math.ceil(len(sequences) / batch_size)
    for b in range(n if max_batches is None else min(n, max_batches)):
        idx = list(range(b * batch_size, min(len(sequences), (b + 1) * batch_size)))
        batch = cache.read(idx) if cache is not None else {}
        batch["input_ids"] = sequences[idx]
        yield batch_to_tensors(batch, device)


class TeacherSource:
    """The teacher side of the run: the checked HDF5 caches, or the live model (eval, no_grad,
    in ``teacher.dtype``)."""

    def __init__(self, params: Params, data, teacher_dir: Path, cache_dir: Path, device: torch.device):
        self.caches: dict[str, TeacherLogitCache | None] = {"train": None, "validation": None}
        self.model = None
        self.top_k, self.vocab = params.teacher.top_k, data.meta["tokenizer"]["vocab_size"]
        if params.teacher.use_cached_logits:
            for split in self.caches:
                self.caches[split] = TeacherLogitCache(cache_dir / f"{split}.h5")
                self.caches[split].check_fingerprint(expected_fingerprint(data, teacher_dir, params, split))
        else:
            self.model = load_teacher(teacher_dir, params.teacher, device)

    def fn(self, batch: dict[str, torch.Tensor], temperature: float, mode: str):
        """``teacher_fn(start, end)`` for one batch (see :func:`kdsweep.losses.distillation_loss`)."""
        if self.model is None:
            return cached_teacher_fn(batch, self.caches["train"].betas, temperature)
        return live_teacher_fn(self.model, batch["input_ids"], temperature, mode, self.top_k, self.vocab)

    def close(self) -> None:
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
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return psutil.Process().memory_info().rss / 2**20


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
    run_dir: Path | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    eval_hook: EvalHook | None = None,
) -> dict:
    """Distill the student; returns the metrics written to ``metrics_path``.

    ``eval_hook(step, metrics)`` runs after every evaluation; returning True stops the run
    with state ``pruned``. ``resume`` continues exactly from ``<checkpoint_dir>/last``
    (default ``$KDSWEEP_CHECKPOINT_DIR`` or ``checkpoints/distill``). ``run_dir`` defaults to
    ``$KDSWEEP_RUN_DIR`` or ``runs/distill``.

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
    try:
        return _train(
            params,
            prepared_dir=Path(prepared_dir),
            teacher_dir=Path(teacher_dir),
            cache_dir=Path(cache_dir),
            student_dir=Path(student_dir),
            out_dir=Path(out),
            metrics_path=Path(metrics_path),
            plots_dir=Path(plots_dir),
            run_dir=run_dir,
            checkpoint_dir=checkpoint_dir,
            resume=resume,
            eval_hook=eval_hook,
        )
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def _train(
    params: Params,
    *,
    prepared_dir: Path,
    teacher_dir: Path,
    cache_dir: Path,
    student_dir: Path,
    out_dir: Path,
    metrics_path: Path,
    plots_dir: Path,
    run_dir: Path | None,
    checkpoint_dir: Path | None,
    resume: bool,
    eval_hook: EvalHook | None,
) -> dict:
    tr, loss_cfg = params.training, params.loss
    device = default_device()
    data = load_prepared(prepared_dir)
    student = load_causal_lm(student_dir).to(device)
    student.train()
    if tr.gradient_checkpointing:
        enable_gradient_checkpointing(student)
    stages = resolve_stages(params, math.ceil(len(data.train) / tr.per_device_train_batch_size))
    plans = plan_stages(student, stages)  # a pattern that matches nothing stops here, before the teacher loads

    teacher = TeacherSource(params, data, teacher_dir, cache_dir, device)
    train_set = MicroBatches(data.train, teacher.caches["train"], tr.per_device_train_batch_size, tr.seed)
    for i, st in enumerate(stages):
        if teacher.caches["train"] is not None:
            teacher.caches["train"].check_temperature(
                st.temperature, f"stages.configs.{i}.temperature" if params.stages.enabled else "loss.temperature"
            )
    eval_spec = LossSpec(
        alpha=0.0,
        temperature=1.0,
        mode="dense" if teacher.model is not None else "topk_tail",
        chunk_size=loss_cfg.chunk_size,
    )

    def run_eval() -> dict:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=tr.bf16):
            return evaluate(
                student,
                validation_batches(
                    data.validation,
                    teacher.caches["validation"],
                    params.evaluate.batch_size,
                    tr.eval_max_batches,
                    device,
                ),
                lambda b: teacher.fn(b, 1.0, eval_spec.mode),
                eval_spec,
            )

    # Where we are: fresh, or restored from the last checkpoint.
    state = {
        "global_step": 0,
        "stage_index": 0,
        "step_in_stage": 0,
        "micro_batch": 0,
        "nonfinite_total": 0,
        "nonfinite_run": 0,
        "best_val_loss": None,
    }
    # A sweep points these at per-trial directories outside its temporary workspaces.
    checkpoint_dir = Path(checkpoint_dir or os.environ.get("KDSWEEP_CHECKPOINT_DIR") or "checkpoints/distill")
    last_ckpt = checkpoint_dir / "last"
    if resume:
        if not last_ckpt.exists():
            raise UserError(f"--resume: no checkpoint at {last_ckpt}; run without --resume to start fresh")
        state = {**state, **checkpoint.load_state(last_ckpt)}
        changed = checkpoint.changed_params(last_ckpt, params.model_dump(mode="json"))
        print(
            f"distill: resuming from {last_ckpt} at step {state['global_step']}"
            + (f"; warning: params changed since the checkpoint: {', '.join(changed)}" if changed else "")
        )
    resumed_from = state["global_step"]

    run_dir = Path(run_dir or os.environ.get("KDSWEEP_RUN_DIR") or "runs/distill")
    # On resume, events a crashed run wrote after the checkpoint are dropped (purge_step).
    writer = SummaryWriter(str(run_dir), purge_step=resumed_from + 1 if resume else None)
    plots_dir.mkdir(parents=True, exist_ok=True)
    train_csv = _csv(
        plots_dir / "train.csv",
        ["step", "loss", "ce", "kl", "grad_norm", "tokens_per_s"],
        resumed_from if resume else None,
    )
    eval_csv = _csv(
        plots_dir / "eval.csv", ["step", "val_loss", "val_kl", "val_top1_agreement"], resumed_from if resume else None
    )
    total_steps = sum(s.steps for s in stages)
    status, last_eval, start_time = "complete", {}, time.perf_counter()
    started_at = psutil.Process().create_time()  # this process's start (imports and loading precede the loop)
    startup_seconds = time.time() - started_at
    initial_val_loss = None
    if resumed_from == 0:
        last_eval = run_eval()
        initial_val_loss = last_eval["val_loss"]
        _log_eval(writer, eval_csv, 0, last_eval)
    bar = tqdm(total=total_steps, initial=resumed_from, desc="distill", unit="step", dynamic_ncols=True)
    window, optimizer = _Window(), None
    restore_at = state["stage_index"] if resume else None  # the checkpoint's stage gets its optimizer back
    if restore_at == len(stages):  # the run had finished: nothing left to train
        checkpoint.restore(last_ckpt, student, None)

    for stage_index in range(state["stage_index"], len(stages)):
        st, plan = stages[stage_index], plans[stage_index]
        spec = LossSpec(
            st.alpha,
            st.temperature,
            loss_cfg.mode,
            loss_cfg.direction,
            loss_cfg.scale_by_t2,
            loss_cfg.chunk_size,
            loss_cfg.jsd_beta,
        )
        table = format_plan(plan, st.learning_rate)
        tqdm.write(
            f"stage {stage_index + 1}/{len(stages)} '{st.name}': {st.steps} steps, alpha {st.alpha}, "
            f"T {st.temperature}, lr {st.learning_rate:g}, warmup {st.warmup_steps}\n{table}"
        )
        writer.add_text(f"param_groups/{st.name}", "    " + table.replace("\n", "\n    "), state["global_step"])
        groups = build_param_groups(
            student, plan, st.learning_rate, tr.weight_decay, tr.weight_decay_on_norms_biases_embeddings
        )
        optimizer = torch.optim.AdamW(groups, lr=st.learning_rate, betas=(tr.adam_beta1, tr.adam_beta2))
        trainable = [p for g in optimizer.param_groups for p in g["params"]]
        first = state["step_in_stage"]  # 0 unless resuming inside this stage
        if stage_index == restore_at:
            checkpoint.restore(last_ckpt, student, optimizer)
        loader = torch.utils.data.DataLoader(
            train_set,
            sampler=range(
                state["micro_batch"], state["micro_batch"] + (st.steps - first) * tr.gradient_accumulation_steps
            ),
            batch_size=None,
            num_workers=tr.dataloader_num_workers,
        )
        batches = iter(loader)

        for step_in_stage in range(first, st.steps):
            factor = lr_factor(
                step_in_stage,
                warmup_steps=st.warmup_steps,
                total_steps=st.steps,
                kind=tr.lr_scheduler,
                min_ratio=tr.min_lr_ratio,
            )
            for g in optimizer.param_groups:
                g["lr"] = st.learning_rate * g["lr_multiplier"] * factor
            t0 = time.perf_counter()
            micro = [batch_to_tensors(next(batches), device) for _ in range(tr.gradient_accumulation_steps)]
            # batchmean over the whole accumulated batch: every micro-batch divides by this.
            n_tokens = sum(b["input_ids"][:, 1:].numel() for b in micro)
            sums = torch.zeros(3, dtype=torch.float64, device=device)
            for b in micro:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=tr.bf16):
                    out = student_loss(student, b["input_ids"], teacher.fn(b, st.temperature, spec.mode), spec)
                loss = out.total(n_tokens)
                loss.backward()
                sums += torch.stack([loss.detach(), out.ce_sum / n_tokens, out.kl_sum / n_tokens]).double()
            total, ce, kl = sums.tolist()
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, tr.max_grad_norm or float("inf")).item()
            if math.isfinite(total) and math.isfinite(grad_norm):
                optimizer.step()
                state["nonfinite_run"] = 0
                window.add(total, ce, kl)
            else:  # skipped: no update, Adam's moments untouched
                state["nonfinite_run"] += 1
                state["nonfinite_total"] += 1
                tqdm.write(
                    f"Step {state['global_step'] + 1}: non-finite loss ({total}) or gradient norm "
                    f"({grad_norm}); step skipped ({state['nonfinite_run']} in a row)"
                )
            optimizer.zero_grad(set_to_none=True)
            state["global_step"] += 1
            state["step_in_stage"] = step_in_stage + 1
            state["micro_batch"] += tr.gradient_accumulation_steps
            window.tokens, window.seconds = window.tokens + n_tokens, window.seconds + time.perf_counter() - t0
            step = state["global_step"]
            bar.update(1)
            bar.set_postfix(loss=f"{total:.3f}")
            if state["nonfinite_run"] >= tr.max_nonfinite_steps:
                status = "stopped_nonfinite"
                break

            if step % tr.logging_steps == 0 or step == total_steps:
                _log_train(writer, train_csv, step, window, grad_norm, optimizer, device, state["nonfinite_total"])
                window = _Window()
            if step % tr.eval_steps == 0 or step == total_steps:
                last_eval = run_eval()
                if math.isfinite(last_eval["val_loss"]):
                    best = state["best_val_loss"]
                    state["best_val_loss"] = last_eval["val_loss"] if best is None else min(best, last_eval["val_loss"])
                _log_eval(writer, eval_csv, step, last_eval)
                if eval_hook is not None and eval_hook(step, last_eval):
                    status = "pruned"
                    break
            if tr.save_steps and step % tr.save_steps == 0:
                checkpoint.save(
                    last_ckpt, student, optimizer, {**state, "stage_name": st.name}, params.model_dump(mode="json")
                )
        if status != "complete":
            break
        state["step_in_stage"] = 0
        state["stage_index"] = stage_index + 1
    bar.close()

    if not last_eval or status == "stopped_nonfinite":
        last_eval = run_eval()
    train_seconds, save_start = time.perf_counter() - start_time, time.perf_counter()
    _save_pretrained_atomically(student, out_dir)
    checkpoint.save(last_ckpt, student, optimizer, {**state, "status": status}, params.model_dump(mode="json"))
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
            "best_val_loss": min(
                (v for v in (state["best_val_loss"], last_eval["val_loss"]) if v is not None and math.isfinite(v)),
                default=None,
            ),
            "steps": state["global_step"],
            "nonfinite_steps": state["nonfinite_total"],
            "train_seconds": round(train_seconds, 1),
            "initial_val_loss": initial_val_loss,
            "started_at": round(started_at, 3),
            "seconds": seconds,
        }
    )
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.with_name(metrics_path.name + ".tmp").write_text(json.dumps(metrics, indent=2) + "\n")
    os.replace(metrics_path.with_name(metrics_path.name + ".tmp"), metrics_path)
    _log_hparams(writer, params, metrics)
    writer.close()
    teacher.close()
    if status == "stopped_nonfinite":
        raise UserError(
            f"distill: stopped after {tr.max_nonfinite_steps} non-finite losses in a row "
            f"(step {state['global_step']}, state 'stopped_nonfinite' in {metrics_path}); "
            "lower training.learning_rate or loss.temperature, keep training.max_grad_norm"
        )
    return metrics


def _save_pretrained_atomically(model, out_dir: Path) -> None:
    """save_pretrained into a temporary sibling, then swap it in: a crash never leaves a
    half-written student where DVC (whose outputs persist) would pick it up."""
    tmp, old = out_dir.with_name(out_dir.name + ".tmp"), out_dir.with_name(out_dir.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _csv(path: Path, columns: list[str], resumed_from: int | None):
    """A CSV of curves; on resume, rows a crashed run wrote after the checkpoint are dropped."""
    if resumed_from is not None and path.exists():
        lines = path.read_text().splitlines()
        keep = [lines[0]] + [line for line in lines[1:] if int(line.split(",")[0]) <= resumed_from]
        path.write_text("".join(line + "\n" for line in keep))
        return path.open("a")
    f = path.open("w")
    f.write(",".join(columns) + "\n")
    return f


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


def _log_train(
    writer: SummaryWriter, csv, step: int, window: _Window, grad_norm: float, optimizer, device, nonfinite_total: int
) -> None:
    """Console line, TensorBoard scalars and a CSV row: losses averaged over the finite steps
    since the last log; the LR of each group named by its pattern."""
    n = max(window.finite_steps, 1)
    total, ce, kl = window.loss / n, window.ce / n, window.kl / n
    tps = window.tokens / max(window.seconds, 1e-9)
    tqdm.write(f"Step {step}: Total Loss: {total:.4f}, CE Loss: {ce:.4f}, KL Loss: {kl:.4f}")
    for name, value in {
        "loss": total,
        "ce": ce,
        "kl": kl,
        "grad_norm": grad_norm,
        "nonfinite_steps": nonfinite_total,
    }.items():
        writer.add_scalar(f"train/{name}", value, step)
    for g in optimizer.param_groups:  # decay / no-decay halves of a pattern share its LR
        writer.add_scalar(f"lr/{g['name']}", g["lr"], step)
    writer.add_scalar("perf/tokens_per_s", tps, step)
    writer.add_scalar("perf/memory_mb", memory_mb(device), step)
    csv.write(f"{step},{total:.6f},{ce:.6f},{kl:.6f},{grad_norm:.6f},{tps:.1f}\n")
    csv.flush()


def _log_eval(writer: SummaryWriter, csv, step: int, metrics: dict) -> None:
    tqdm.write(
        f"Step {step}: Val Loss: {metrics['val_loss']:.4f}, Val KL: {metrics['val_kl']:.4f}, "
        f"Top-1 Agreement: {metrics['val_top1_agreement']:.3f}"
    )
    for name in ("val_loss", "val_kl", "val_top1_agreement", "val_perplexity"):
        writer.add_scalar(f"eval/{name}", metrics[name], step)
    csv.write(f"{step},{metrics['val_loss']:.6f},{metrics['val_kl']:.6f},{metrics['val_top1_agreement']:.6f}\n")
    csv.flush()


def _finite_or_none(metrics: dict) -> dict:
    """NaN and inf become null, so the file stays strict JSON (DVC and other readers)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}


def _lookup(tree, dotted: str):
    """``tree["a"]["b"][0]`` for ``"a.b.0"``; KeyError if absent."""
    node = tree
    for part in dotted.split("."):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            raise KeyError(dotted)
    return node


def hparams_of(params: Params) -> dict:
    """The swept knobs, flattened for TensorBoard's HParams tab.

    A fixed set (alpha, temperature, mode, LR, the stage layout, every LR multiplier) plus
    every dotted key listed in ``KDSWEEP_HPARAM_KEYS`` (set by the sweep runner to the keys
    it samples); values that are not numbers, strings or booleans are written as JSON.
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
    for key in filter(None, (k.strip() for k in os.environ.get("KDSWEEP_HPARAM_KEYS", "").split(","))):
        try:
            value = _lookup(dumped, key)
        except KeyError:
            tqdm.write(f"distill: warning: KDSWEEP_HPARAM_KEYS names {key!r}, which is not a params key; not logged")
            continue
        hp[key] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
    return hp


def _log_hparams(writer: SummaryWriter, params: Params, metrics: dict) -> None:
    """HParams summaries written into this run's own directory: one row per run in TensorBoard."""
    from torch.utils.tensorboard.summary import hparams

    final = {
        f"hparam/{k}": float(metrics[k])
        for k in ("val_loss", "best_val_loss", "val_kl", "val_top1_agreement")
        if metrics.get(k) is not None
    }
    exp, ssi, sei = hparams(hparams_of(params), final)
    for summary in (exp, ssi, sei):
        writer.file_writer.add_summary(summary)
    for k, v in final.items():
        writer.add_scalar(k, v, metrics["steps"])
