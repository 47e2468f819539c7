"""Stage ``distill``: train the student on the teacher, one readable loop.

    for each stage (freeze, then unfreeze, ...):
        build parameter groups from the regex multipliers (0 freezes), a fresh AdamW
        for each optimizer step:
            set each group's LR from the schedule
            accumulate micro-batches: forward, chunked CE + KL loss, backward
            skip the step if the loss is not finite; clip; step
            log; evaluate (and let a sweep prune); checkpoint

Outputs: the student (``models/student``, save_pretrained), ``metrics/distill.json``,
``plots/distill/{train,eval}.csv`` and TensorBoard events in the run directory.
"""

from __future__ import annotations

import json
import math
import os
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
from kdsweep.losses import LossSpec, distillation_loss
from kdsweep.models import default_device, load_causal_lm, load_teacher
from kdsweep.param_groups import build_param_groups, format_plan, plan_groups
from kdsweep.schedule import lr_factor
from kdsweep.stages.teacher_logits import expected_fingerprint
from kdsweep.teachers import batch_to_tensors, cached_teacher_fn, live_teacher_fn, shifted_targets

# Called after every evaluation with (global step, metrics); returning True stops the run
# (a sweep's pruner). The run then ends with state "pruned".
EvalHook = Callable[[int, dict], bool]


@dataclass
class Stage:
    """One resolved entry of the stage layout (a run without ``stages`` has one)."""

    name: str
    steps: int
    rules: list[LRMultiplier]
    learning_rate: float
    alpha: float
    temperature: float
    warmup_steps: int


def resolve_stages(params: Params, micro_batches_per_epoch: int) -> list[Stage]:
    """Stage lengths in optimizer steps, with every optional override filled in."""
    tr, loss = params.training, params.loss

    def steps(epochs: float | None, max_steps: int | None) -> int:
        if max_steps is not None:
            return max_steps
        return max(1, math.ceil(epochs * micro_batches_per_epoch / tr.gradient_accumulation_steps))

    if not params.stages.enabled:
        return [Stage("train", steps(tr.num_train_epochs, tr.max_steps), params.parameter_lr_multipliers,
                      tr.learning_rate, loss.alpha, loss.temperature, tr.warmup_steps)]
    return [
        Stage(s.stage_name, steps(s.num_epochs, s.max_steps),
              s.parameter_lr_multipliers if s.parameter_lr_multipliers is not None else params.parameter_lr_multipliers,
              s.learning_rate or tr.learning_rate, loss.alpha if s.alpha is None else s.alpha,
              s.temperature or loss.temperature, tr.warmup_steps if s.warmup_steps is None else s.warmup_steps)
        for s in params.stages.configs
    ]


class MicroBatches(torch.utils.data.Dataset):
    """Micro-batch ``m`` of the run, as numpy arrays: a pure function of (seed, m).

    Epoch e visits the training sequences in the order ``permutation(seed, e)``; so a
    resumed run sees exactly the batches the uninterrupted run would have.
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


def validation_batches(sequences: np.ndarray, cache: TeacherLogitCache | None, batch_size: int,
                       max_batches: int | None, device: torch.device):
    n = math.ceil(len(sequences) / batch_size)
    for b in range(n if max_batches is None else min(n, max_batches)):
        idx = list(range(b * batch_size, min(len(sequences), (b + 1) * batch_size)))
        batch = cache.read(idx) if cache is not None else {}
        batch["input_ids"] = sequences[idx]
        yield batch_to_tensors(batch, device)


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return psutil.Process().memory_info().rss / 2**20


def main(params: Params, *, prepared_dir: Path = Path("data/prepared"), teacher_dir: Path = Path("models/teacher"),
         cache_dir: Path = Path("data/teacher_logits"), student_dir: Path = Path("models/student_init"),
         out: Path = Path("models/student"), metrics_path: Path = Path("metrics/distill.json"),
         plots_dir: Path = Path("plots/distill"), run_dir: Path | None = None,
         checkpoint_dir: Path | None = None, resume: bool = False,
         eval_hook: EvalHook | None = None) -> dict:
    """Distill the student; returns the metrics written to ``metrics_path``."""
    tr, loss_cfg = params.training, params.loss
    if tr.threads:
        torch.set_num_threads(tr.threads)
    torch.manual_seed(tr.seed)
    if tr.deterministic:
        torch.use_deterministic_algorithms(True)
    device = default_device()
    data = load_prepared(prepared_dir)

    # The teacher: the cache (checked against this data and teacher) or the live model.
    caches: dict[str, TeacherLogitCache | None] = {"train": None, "validation": None}
    teacher = None
    if params.teacher.use_cached_logits:
        for split in caches:
            caches[split] = TeacherLogitCache(cache_dir / f"{split}.h5")
            caches[split].check_fingerprint(expected_fingerprint(data, teacher_dir, params, split))
    else:
        teacher = load_teacher(teacher_dir, params.teacher, device)
    student = load_causal_lm(student_dir).to(device)
    student.train()
    if tr.gradient_checkpointing:
        student.gradient_checkpointing_enable()
    vocab = data.meta["tokenizer"]["vocab_size"]

    def teacher_fn_for(batch: dict, temperature: float, mode: str):
        if teacher is None:
            betas = caches["train"].betas
            return cached_teacher_fn(batch, betas, temperature)
        return live_teacher_fn(teacher, batch["input_ids"], temperature, mode, params.teacher.top_k, vocab)

    train_set = MicroBatches(data.train, caches["train"], tr.per_device_train_batch_size, tr.seed)
    stages = resolve_stages(params, train_set.per_epoch)
    for i, st in enumerate(stages):
        if caches["train"] is not None:
            caches["train"].check_temperature(st.temperature, "loss.temperature" if not params.stages.enabled
                                              else f"stages.configs.{i}.temperature")
    eval_spec = LossSpec(alpha=0.0, temperature=1.0, mode="topk_tail" if teacher is None else "dense",
                         chunk_size=loss_cfg.chunk_size)

    def run_eval() -> dict:
        return evaluate(student, validation_batches(data.validation, caches["validation"], params.evaluate.batch_size,
                                                    tr.eval_max_batches, device),
                        lambda b: teacher_fn_for(b, 1.0, eval_spec.mode), eval_spec)

    # Where we are: fresh, or restored from the last checkpoint.
    state = {"global_step": 0, "stage_index": 0, "step_in_stage": 0, "micro_batch": 0, "nonfinite_total": 0,
             "best_val_loss": None}
    # A sweep points these at per-trial directories outside its temporary workspaces.
    checkpoint_dir = Path(checkpoint_dir or os.environ.get("KDSWEEP_CHECKPOINT_DIR") or "checkpoints/distill")
    last_ckpt = checkpoint_dir / "last"
    if resume:
        if not last_ckpt.exists():
            raise UserError(f"--resume: no checkpoint at {last_ckpt}; run without --resume to start fresh")
        state = checkpoint.load_state(last_ckpt)
        print(f"distill: resuming from {last_ckpt} at step {state['global_step']}")

    run_dir = Path(run_dir or os.environ.get("KDSWEEP_RUN_DIR") or "runs/distill")
    writer = SummaryWriter(str(run_dir))
    plots_dir.mkdir(parents=True, exist_ok=True)
    train_csv = _csv(plots_dir / "train.csv", ["step", "loss", "ce", "kl", "grad_norm", "tokens_per_s"], resume)
    eval_csv = _csv(plots_dir / "eval.csv", ["step", "val_loss", "val_kl", "val_top1_agreement"], resume)
    total_steps = sum(s.steps for s in stages)
    status, last_eval, start_time, tokens_seen = "complete", {}, time.perf_counter(), 0
    if state["global_step"] == 0:
        last_eval = run_eval()
        _log_eval(writer, eval_csv, 0, last_eval)
        print(f"Step 0: Val Loss: {last_eval['val_loss']:.4f}, Val KL: {last_eval['val_kl']:.4f}, "
              f"Top-1 Agreement: {last_eval['val_top1_agreement']:.3f}")
    bar = tqdm(total=total_steps, initial=state["global_step"], desc="distill", unit="step", dynamic_ncols=True)
    nonfinite_run = 0

    for stage_index in range(state["stage_index"], len(stages)):
        st = stages[stage_index]
        spec = LossSpec(st.alpha, st.temperature, loss_cfg.mode, loss_cfg.direction, loss_cfg.scale_by_t2,
                        loss_cfg.chunk_size)
        where = "parameter_lr_multipliers" if not params.stages.enabled or \
            params.stages.configs[stage_index].parameter_lr_multipliers is None \
            else f"stages.configs.{stage_index}.parameter_lr_multipliers"
        plan = plan_groups([(n, p.numel()) for n, p in student.named_parameters()],
                           [(r.pattern, r.lr_multiplier) for r in st.rules], where=where)
        table = format_plan(plan, st.learning_rate)
        tqdm.write(f"stage {stage_index + 1}/{len(stages)} '{st.name}': {st.steps} steps, alpha {st.alpha}, "
                   f"T {st.temperature}\n{table}")
        writer.add_text(f"param_groups/{st.name}", "    " + table.replace("\n", "\n    "), state["global_step"])
        groups = build_param_groups(student, plan, st.learning_rate, tr.weight_decay,
                                    tr.weight_decay_on_norms_biases_embeddings)
        optimizer = torch.optim.AdamW(groups, lr=st.learning_rate, betas=(tr.adam_beta1, tr.adam_beta2))
        first = state["step_in_stage"] if stage_index == state["stage_index"] else 0
        if resume and stage_index == state["stage_index"]:
            checkpoint.restore(last_ckpt, student, optimizer)
        loader = torch.utils.data.DataLoader(
            train_set, sampler=range(state["micro_batch"], state["micro_batch"] + (st.steps - first)
                                     * tr.gradient_accumulation_steps),
            batch_size=None, num_workers=tr.dataloader_num_workers)
        batches = iter(loader)

        for step_in_stage in range(first, st.steps):
            factor = lr_factor(step_in_stage, warmup_steps=st.warmup_steps, total_steps=st.steps,
                               kind=tr.lr_scheduler, min_ratio=tr.min_lr_ratio)
            for g in optimizer.param_groups:
                g["lr"] = st.learning_rate * g["lr_multiplier"] * factor
            t0 = time.perf_counter()
            micro = [batch_to_tensors(next(batches), device) for _ in range(tr.gradient_accumulation_steps)]
            # batchmean over the whole accumulated batch: every micro-batch divides by this.
            n_tokens = sum(int(shifted_targets(b["input_ids"]).numel()) for b in micro)
            ce = kl = total = 0.0
            for b in micro:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=tr.bf16):
                    hidden = student.get_decoder()(input_ids=b["input_ids"]).last_hidden_state[:, :-1]
                sums = distillation_loss(hidden.reshape(-1, hidden.shape[-1]), student.get_output_embeddings().weight,
                                         shifted_targets(b["input_ids"]),
                                         teacher_fn_for(b, st.temperature, spec.mode), spec)
                loss = sums.total(spec, n_tokens)
                loss.backward()
                total, ce, kl = total + loss.item(), ce + sums.ce_sum.item(), kl + sums.kl_sum.item()
            params_with_grad = [p for g in optimizer.param_groups for p in g["params"]]
            grad_norm = torch.nn.utils.clip_grad_norm_(params_with_grad, tr.max_grad_norm or float("inf")).item()
            if not (math.isfinite(total) and math.isfinite(grad_norm)):
                optimizer.zero_grad(set_to_none=True)
                nonfinite_run += 1
                state["nonfinite_total"] += 1
                tqdm.write(f"Step {state['global_step'] + 1}: non-finite loss ({total}) or gradient norm; step skipped")
                if nonfinite_run >= tr.max_nonfinite_steps:
                    status = "stopped_nonfinite"
                    break
            else:
                nonfinite_run = 0
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            state["global_step"] += 1
            state["step_in_stage"] = step_in_stage + 1
            state["micro_batch"] += tr.gradient_accumulation_steps
            tokens_seen += n_tokens
            step = state["global_step"]
            bar.update(1)
            bar.set_postfix(loss=f"{total:.3f}")

            if step % tr.logging_steps == 0 or step == total_steps:
                tps = n_tokens / (time.perf_counter() - t0)
                ce, kl = ce / n_tokens, kl / n_tokens
                tqdm.write(f"Step {step}: Total Loss: {total:.4f}, CE Loss: {ce:.4f}, KL Loss: {kl:.4f}")
                for name, value in {"loss": total, "ce": ce, "kl": kl, "grad_norm": grad_norm}.items():
                    writer.add_scalar(f"train/{name}", value, step)
                for g in optimizer.param_groups:
                    writer.add_scalar(f"lr/{g['name']}", g["lr"], step)
                writer.add_scalar("perf/tokens_per_s", tps, step)
                writer.add_scalar("perf/memory_mb", memory_mb(device), step)
                train_csv.write(f"{step},{total:.6f},{ce:.6f},{kl:.6f},{grad_norm:.6f},{tps:.1f}\n")
                train_csv.flush()
            if step % tr.eval_steps == 0 or step == total_steps:
                last_eval = run_eval()
                best = state["best_val_loss"]
                state["best_val_loss"] = last_eval["val_loss"] if best is None else min(best, last_eval["val_loss"])
                _log_eval(writer, eval_csv, step, last_eval)
                tqdm.write(f"Step {step}: Val Loss: {last_eval['val_loss']:.4f}, Val KL: {last_eval['val_kl']:.4f}, "
                           f"Top-1 Agreement: {last_eval['val_top1_agreement']:.3f}")
                if eval_hook is not None and eval_hook(step, last_eval):
                    status = "pruned"
                    break
            if tr.save_steps and step % tr.save_steps == 0:
                checkpoint.save(last_ckpt, student, optimizer, {**state, "stage_index": stage_index},
                                params.model_dump(mode="json"))
        if status != "complete":
            break
        state["step_in_stage"] = 0
    bar.close()

    if not last_eval or status == "stopped_nonfinite":
        last_eval = run_eval()
    student.save_pretrained(out)
    metrics = {
        "state": status, **{k: v for k, v in last_eval.items() if k != "val_tokens"},
        "best_val_loss": min(v for v in (state["best_val_loss"], last_eval["val_loss"]) if v is not None),
        "steps": state["global_step"], "nonfinite_steps": state["nonfinite_total"],
        "train_seconds": round(time.perf_counter() - start_time, 1),
    }
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps(metrics, indent=2))
    _log_hparams(writer, params, metrics)
    writer.close()
    for c in caches.values():
        if c is not None:
            c.close()
    if status == "stopped_nonfinite":
        raise UserError(f"distill: stopped after {tr.max_nonfinite_steps} non-finite losses in a row "
                        f"(step {state['global_step']}); lower training.learning_rate or loss.temperature")
    return metrics


def _csv(path: Path, columns: list[str], append: bool):
    if append and path.exists():
        return path.open("a")
    f = path.open("w")
    f.write(",".join(columns) + "\n")
    return f


def _log_eval(writer: SummaryWriter, csv, step: int, metrics: dict) -> None:
    for name in ("val_loss", "val_kl", "val_top1_agreement", "val_perplexity"):
        writer.add_scalar(f"eval/{name}", metrics[name], step)
    csv.write(f"{step},{metrics['val_loss']:.6f},{metrics['val_kl']:.6f},{metrics['val_top1_agreement']:.6f}\n")
    csv.flush()


def hparams_of(params: Params) -> dict:
    """The swept knobs, flattened for TensorBoard's HParams tab."""
    hp = {"loss.alpha": params.loss.alpha, "loss.temperature": params.loss.temperature,
          "loss.mode": params.loss.mode, "training.learning_rate": params.training.learning_rate,
          "stages.enabled": params.stages.enabled,
          "stages.layout": "+".join(s.stage_name for s in params.stages.configs) if params.stages.enabled else "single"}
    for rule in params.parameter_lr_multipliers:
        hp[f"lr_multiplier[{rule.pattern}]"] = rule.lr_multiplier
    return hp


def _log_hparams(writer: SummaryWriter, params: Params, metrics: dict) -> None:
    """HParams summaries written into this run's own directory: one row per run in TensorBoard."""
    from torch.utils.tensorboard.summary import hparams

    final = {f"hparam/{k}": float(metrics[k]) for k in ("val_loss", "best_val_loss", "val_kl", "val_top1_agreement")}
    exp, ssi, sei = hparams(hparams_of(params), final)
    for summary in (exp, ssi, sei):
        writer.file_writer.add_summary(summary)
    for k, v in final.items():
        writer.add_scalar(k, v, metrics["steps"])
