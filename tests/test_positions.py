"""KD position selection (``loss.kd_positions``): the student's most uncertain positions, per sequence.

The default (every position) is bit-identical to the unselected path; with f < 1 the chunked loss
equals a float64 reference and plain autograd for every target kind, averages the KD term over
the selected positions, is invariant to how sequences are split into micro-batches, and a bad
fraction is a one-line config error.
"""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from contextlib import chdir
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import tiny_params_dict

from kdsweep.cache.format import sample_ids
from kdsweep.compress import load_student
from kdsweep.config import validate
from kdsweep.errors import UserError
from kdsweep.losses import (
    IGNORE_INDEX,
    LossSpec,
    SampledTeacher,
    SparseTeacher,
    distillation_loss,
    kd_position_count,
    loss_sums,
    sampled_teacher,
    select_kd_positions,
    sparse_teacher_from_logits,
    student_entropy,
)

S, L, H, V = 4, 12, 10, 24  # sequences, positions per sequence, hidden size, vocabulary
PADDING = [0, 3, 0, 5]  # trailing positions without a target, per sequence


def randn(*shape, seed: int, scale: float = 1.0, dtype=torch.float64) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def targets_with_padding(seed: int = 1) -> torch.Tensor:
    """(S * L,) next-token ids with each sequence's trailing padding set to -100."""
    targets = torch.randint(0, V, (S, L), generator=torch.Generator().manual_seed(seed))
    for i, pad in enumerate(PADDING):
        if pad:
            targets[i, L - pad :] = IGNORE_INDEX
    return targets.reshape(-1)


def teacher_of(kind: str, teacher_logits: torch.Tensor, temperature: float):
    """The teacher in the form loss mode ``kind`` takes, and its ``teacher_fn`` over positions."""
    if kind == "dense":
        return teacher_logits.float(), lambda a, b: teacher_logits[a:b].float()
    if kind == "sampled":
        ids, counts = sample_ids(teacher_logits, 16, temperature, torch.Generator().manual_seed(7))
        lp = torch.log_softmax(teacher_logits / temperature, -1).gather(-1, ids)
        t = sampled_teacher(ids, counts, lp, lp)
        t = SampledTeacher(t.ids, t.log_probs.float(), t.weights.float())
        return t, lambda a, b: SampledTeacher(t.ids[a:b], t.log_probs[a:b], t.weights[a:b])
    k = V if kind == "topk_tail_full" else 6
    t = sparse_teacher_from_logits(teacher_logits.float(), k, temperature)
    return t, lambda a, b: SparseTeacher(t.ids[a:b], t.log_probs[a:b])


def reference_mask(logits: torch.Tensor, targets: torch.Tensor, fraction: float) -> torch.Tensor:
    """(S * L,) the selection by definition, in float64: per sequence, the ceil(f * n) real positions
    of highest entropy -sum p log p."""
    p = F.softmax(logits.double(), -1)
    entropy = -(p * p.log()).sum(-1).view(S, L)
    real = (targets != IGNORE_INDEX).view(S, L)
    mask = torch.zeros(S, L, dtype=torch.bool)
    for i in range(S):
        positions = [j for j in range(L) if real[i, j]]
        positions.sort(key=lambda j: -float(entropy[i, j]))
        mask[i, positions[: math.ceil(fraction * len(positions))]] = True
    return mask.reshape(-1)


def run_fused(spec: LossSpec, hidden0, weight0, targets, teacher_fn, normalizer: int):
    """The chunked path: loss ``total(normalizer)``, its sums and the gradients of hidden and head."""
    hidden, weight = hidden0.clone().requires_grad_(), weight0.clone().requires_grad_()
    out = distillation_loss(hidden, weight, targets, teacher_fn, spec, sequence_length=L)
    loss = out.total(normalizer)
    loss.backward()
    return loss.detach(), out, hidden.grad, weight.grad


# --------------------------------------------------------------------------- the default
@pytest.mark.parametrize("mode", ["topk_tail", "topk_renorm", "dense", "sampled"])
def test_default_is_every_position_and_the_masked_path_changes_no_bit(mode):
    """f = 1 (the default) takes the unselected path; a fraction that selects every real position
    (ceil(0.999 n) = n for n < 1000) goes through the entropy pass and the masks, and gives the
    same loss, sums and gradients to the last bit."""
    assert LossSpec(alpha=0.5, temperature=2.0).kd_fraction == 1.0
    assert LossSpec(alpha=0.5, temperature=2.0).kl_weight == 0.5 * 2.0**2
    teacher_logits, targets = randn(S * L, V, seed=2, scale=3.0), targets_with_padding()
    kind = "topk_tail" if mode == "topk_renorm" else mode
    _, fn = teacher_of(kind, teacher_logits, 2.0)
    hidden, weight = randn(S * L, H, seed=3, dtype=torch.float32), randn(V, H, seed=4, dtype=torch.float32)
    n = int((targets != IGNORE_INDEX).sum())
    results = []
    for fraction in (1.0, 0.999):
        spec = LossSpec(alpha=0.4, temperature=2.0, mode=mode, chunk_size=7, kd_fraction=fraction)
        results.append(run_fused(spec, hidden, weight, targets, fn, n))
    (l1, o1, gh1, gw1), (l2, o2, gh2, gw2) = results
    assert o1.kd_tokens == o2.kd_tokens == o1.num_tokens == n
    assert torch.equal(l1, l2) and torch.equal(o1.kl_sum, o2.kl_sum) and torch.equal(o1.ce_sum, o2.ce_sum)
    assert torch.equal(gh1, gh2) and torch.equal(gw1, gw2)


# --------------------------------------------------------------------------- selection
def test_selection_takes_the_highest_entropy_real_positions_of_each_sequence():
    logits, targets = randn(S * L, V, seed=5, scale=2.0), targets_with_padding(seed=6)
    real = (targets != IGNORE_INDEX).view(S, L)
    for fraction in (0.1, 0.25, 0.5, 0.75, 1.0):
        mask = select_kd_positions(student_entropy(logits).view(S, L), real, fraction)
        assert torch.equal(mask.reshape(-1), reference_mask(logits, targets, fraction))
        assert mask.sum(-1).tolist() == [kd_position_count(int(n), fraction) for n in real.sum(-1)]
    assert [kd_position_count(n, f) for n, f in [(10, 0.3), (127, 0.5), (127, 0.25), (1, 0.01), (0, 0.5)]] == [
        3,
        64,
        32,
        1,
        0,
    ]


def test_entropy_is_the_students_own_at_temperature_one():
    logits = randn(3, V, seed=8, scale=2.0)
    p = F.softmax(logits, -1)
    torch.testing.assert_close(student_entropy(logits).double(), -(p * p.log()).sum(-1), atol=1e-5, rtol=0)
    assert not student_entropy(logits.clone().requires_grad_()).requires_grad  # detached
    torch.testing.assert_close(student_entropy(torch.zeros(1, V)), torch.tensor([math.log(V)]))


# --------------------------------------------------------------------------- the loss with selection
@pytest.mark.parametrize("fraction", [0.5, 0.25])
@pytest.mark.parametrize("chunk_size", [7, 64])
def test_selected_loss_and_gradients_equal_a_float64_reference(fraction, chunk_size):
    """top-64 + tail with k = V (exact): the chunked loss at f < 1 equals, within 1e-5,
    (1 - a) * mean CE over every real position + a * T^2 * mean KL over the selected ones,
    written in float64 from the definition, and so do its gradients."""
    alpha, temperature = 0.6, 2.0
    teacher_logits, targets = randn(S * L, V, seed=9, scale=3.0), targets_with_padding(seed=10)
    hidden0, weight0 = randn(S * L, H, seed=11), randn(V, H, seed=12, scale=0.5)
    real = targets != IGNORE_INDEX
    n = int(real.sum())
    kd = reference_mask(hidden0 @ weight0.t(), targets, fraction)
    n_kd = sum(kd_position_count(L - pad, fraction) for pad in PADDING)
    assert int(kd.sum()) == n_kd < n

    hidden, weight = hidden0.clone().requires_grad_(), weight0.clone().requires_grad_()
    logits = hidden @ weight.t()
    ce = F.cross_entropy(logits[real], targets[real], reduction="sum") / n
    lp = F.log_softmax(teacher_logits / temperature, -1)
    lq = F.log_softmax(logits / temperature, -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)[kd].sum() / n_kd
    expected = (1 - alpha) * ce + alpha * temperature**2 * kl
    expected.backward()

    _, fn = teacher_of("topk_tail_full", teacher_logits, temperature)
    spec = LossSpec(alpha, temperature, chunk_size=chunk_size, kd_fraction=fraction, kd_scale=n / n_kd)
    loss, out, grad_hidden, grad_weight = run_fused(spec, hidden0, weight0, targets, fn, n)
    assert (out.num_tokens, out.kd_tokens) == (n, n_kd)
    torch.testing.assert_close(loss.double(), expected.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.kl_sum.double() / n_kd, kl.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(grad_hidden.double(), hidden.grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(grad_weight.double(), weight.grad, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("mode", "direction"),
    [
        ("topk_tail", "forward"),
        ("topk_tail", "reverse"),
        ("topk_renorm", "jsd"),
        ("dense", "jsd"),
        ("sampled", "forward"),
    ],
)
def test_chunked_selection_equals_the_naive_path_for_every_target_kind(mode, direction):
    """fp32, within 1e-5: the fused chunks (chunk 7) against plain autograd through :func:`loss_sums`
    with the float64 reference's selection, at f = 0.25, and no KD gradient at unselected positions."""
    temperature, fraction = 1.5, 0.25
    teacher_logits, targets = randn(S * L, V, seed=13, scale=3.0), targets_with_padding(seed=14)
    hidden0, weight0 = randn(S * L, H, seed=15, dtype=torch.float32), randn(V, H, seed=16, dtype=torch.float32)
    n = int((targets != IGNORE_INDEX).sum())
    kd = reference_mask(hidden0 @ weight0.t(), targets, fraction)
    teacher, fn = teacher_of("topk_tail" if mode == "topk_renorm" else mode, teacher_logits, temperature)
    spec = LossSpec(
        alpha=1.0, temperature=temperature, mode=mode, direction=direction, chunk_size=7, kd_fraction=fraction
    )
    spec = LossSpec(**{**spec.__dict__, "kd_scale": n / int(kd.sum())})

    _, out, grad_hidden, grad_weight = run_fused(spec, hidden0, weight0, targets, fn, n)
    hidden, weight = hidden0.clone().requires_grad_(), weight0.clone().requires_grad_()
    ref = loss_sums(hidden @ weight.t(), targets, teacher, spec, kd_mask=kd)
    ref.total(n).backward()
    assert out.kd_tokens == ref.kd_tokens == int(kd.sum())
    torch.testing.assert_close(out.weighted_sum, ref.weighted_sum.detach(), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(out.kl_sum, ref.kl_sum.detach(), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(grad_hidden, hidden.grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(grad_weight, weight.grad, atol=1e-5, rtol=0)
    # alpha = 1: KD only, so a position outside the selection gets no gradient at all.
    assert grad_hidden[~kd].abs().max() == 0 and grad_hidden[kd].abs().sum() > 0


def test_selection_is_the_same_whatever_the_micro_batches():
    """Per-sequence selection and ``kd_scale`` over the whole batch: 4 sequences at once equal
    2 accumulated micro-batches of 2 (loss and gradients), and the KD term is the mean KL over
    the selected positions (alpha 1, no T^2)."""
    fraction, temperature = 0.5, 2.0
    teacher_logits, targets = randn(S * L, V, seed=17, scale=3.0), targets_with_padding(seed=18)
    hidden0, weight0 = randn(S * L, H, seed=19), randn(V, H, seed=20, scale=0.5)
    n = int((targets != IGNORE_INDEX).sum())
    n_kd = sum(kd_position_count(L - pad, fraction) for pad in PADDING)
    _, fn = teacher_of("topk_tail", teacher_logits, temperature)
    spec = LossSpec(1.0, temperature, scale_by_t2=False, chunk_size=5, kd_fraction=fraction, kd_scale=n / n_kd)
    loss, out, grad_hidden, grad_weight = run_fused(spec, hidden0, weight0, targets, fn, n)
    torch.testing.assert_close(loss.double(), out.kl_sum.double() / n_kd, atol=1e-6, rtol=1e-6)

    hidden, weight = hidden0.clone().requires_grad_(), weight0.clone().requires_grad_()
    accumulated, kd_tokens = 0.0, 0
    for j in (0, 2):
        rows = slice(j * L, (j + 2) * L)
        part = distillation_loss(
            hidden[rows], weight, targets[rows], lambda a, b, o=j * L: fn(o + a, o + b), spec, sequence_length=L
        )
        part.total(n).backward()
        accumulated += float(part.total(n).detach())
        kd_tokens += part.kd_tokens
    assert kd_tokens == out.kd_tokens == n_kd
    assert abs(accumulated - float(loss)) <= 1e-6
    torch.testing.assert_close(hidden.grad, grad_hidden, atol=1e-6, rtol=0)
    torch.testing.assert_close(weight.grad, grad_weight, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- config
@pytest.mark.parametrize("fraction", [0, -0.5, 1.5])
def test_a_fraction_outside_zero_one_names_the_key(fraction):
    with pytest.raises(UserError) as info:
        validate(tiny_params_dict(loss={"kd_positions": {"fraction": fraction}}))
    assert "loss.kd_positions.fraction" in str(info.value)


def test_an_unknown_selection_criterion_names_the_key():
    with pytest.raises(UserError) as info:
        validate(tiny_params_dict(loss={"kd_positions": {"by": "teacher_entropy"}}))
    assert "loss.kd_positions.by" in str(info.value) and "student_entropy" in str(info.value)


def test_cli_exits_2_on_a_bad_fraction_without_traceback(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params_dict(loss={"kd_positions": {"fraction": 0}})))
    cli = Path(sys.executable).parent / "kdsweep"
    proc = subprocess.run(
        [str(cli), "distill", "--params", str(params)], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    assert "loss.kd_positions.fraction" in proc.stderr and "Traceback" not in proc.stderr + proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing ran


# --------------------------------------------------------------------------- the distill stage
def distill(root: Path, loss: dict, training: dict) -> tuple[list[dict], dict]:
    """``distill.main`` on the tiny pipeline; its train.csv rows and the student's weights."""
    from kdsweep.stages import distill as stage

    params = validate(tiny_params_dict(loss=loss, training={"max_steps": 2, "logging_steps": 1, **training}))
    with chdir(root):
        stage.main(params, run_dir=root / "runs/distill")
    with (root / "plots/distill/train.csv").open() as f:
        rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    return rows, load_student(root / "models/student").state_dict()


def test_distill_with_selection_accumulated_equals_one_batch(pipeline_copy):
    """The stage wires ``loss.kd_positions``: at f = 0.5, 4 x 2 accumulated sequences train exactly as
    8 at once (per-sequence selection, one ``kd_scale`` per step), and differently from f = 1. The
    student's head is scaled by 3 first (the fitted tiny student is almost the teacher, KL ~ 1e-7)."""
    student = load_student(pipeline_copy / "models/student_init")
    with torch.no_grad():
        student.lm_head.weight.mul_(3.0)
    student.save_pretrained(pipeline_copy / "models/student_init")
    half = {"alpha": 0.5, "kd_positions": {"fraction": 0.5}}
    big_rows, big = distill(pipeline_copy, half, {"per_device_train_batch_size": 8})
    acc_rows, acc = distill(pipeline_copy, half, {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 4})
    full_rows, full = distill(pipeline_copy, {"alpha": 0.5}, {"per_device_train_batch_size": 8})
    for a, b in zip(big_rows, acc_rows, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["kl"] == pytest.approx(b["kl"], rel=1e-5)
    for name, value in acc.items():
        torch.testing.assert_close(value, big[name], atol=1e-5, rtol=0)
    # Step 1 sees the same batch and weights: the KL is a mean over other positions, the CE is not.
    assert abs(big_rows[0]["kl"] - full_rows[0]["kl"]) > 1e-4
    assert big_rows[0]["ce"] == pytest.approx(full_rows[0]["ce"], rel=1e-6)  # same first forward
    assert any(not torch.equal(full[n], big[n]) for n in big)
