"""The compressed MoE student: structure, exactness at full rank, save/load, init and errors."""

import math
import re

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from kdsweep.compress import (
    MODEL_TYPE,
    CompressedExperts,
    CompressedMoeConfig,
    CompressedMoeForCausalLM,
    compress_from_teacher,
    count_parameters,
    register,
)
from kdsweep.errors import UserError

E, TOP_K, H, I, LAYERS, VOCAB = 4, 2, 32, 16, 2, 128  # noqa: E741 (I: the expert width, as in the papers)
FULL_RANK = min(I, H)


TINY = dict(
    vocab_size=VOCAB,
    hidden_size=H,
    intermediate_size=64,
    num_hidden_layers=LAYERS,
    num_experts=E,
    num_experts_per_tok=TOP_K,
    moe_intermediate_size=I,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
)


def tiny_config(**overrides) -> Qwen3MoeConfig:
    return Qwen3MoeConfig(**{**TINY, **overrides})


@pytest.fixture
def teacher() -> Qwen3MoeForCausalLM:
    torch.manual_seed(0)
    return Qwen3MoeForCausalLM(tiny_config()).eval()


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(1))


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def test_parameter_names_and_shapes(teacher):
    student, _ = compress_from_teacher(teacher, wrapper_rank=4)
    names = dict(student.named_parameters())
    core = {n for n in names if re.fullmatch(".*shared_core.*", n)}
    wrappers = {n for n in names if re.fullmatch(".*wrapper.*", n)}

    kinds = ("gate", "up", "down")
    expected_core = {f"model.layers.{i}.mlp.experts.shared_core.{k}_proj.weight" for i in range(LAYERS) for k in kinds}
    expected_wrappers = {
        f"model.layers.{i}.mlp.experts.wrapper_{k}_{ab}" for i in range(LAYERS) for k in kinds for ab in "ab"
    }
    assert core == expected_core
    assert wrappers == expected_wrappers
    # Everything else has exactly the teacher's name: attention, norms, router, embeddings, lm_head.
    teacher_rest = {n for n, _ in teacher.named_parameters() if ".mlp.experts." not in n}
    assert set(names) - core - wrappers == teacher_rest
    assert "model.layers.0.mlp.gate.weight" in teacher_rest

    experts = student.model.layers[0].mlp.experts
    assert isinstance(experts, CompressedExperts)
    assert names["model.layers.0.mlp.experts.shared_core.gate_proj.weight"].shape == (I, H)
    assert names["model.layers.0.mlp.experts.shared_core.down_proj.weight"].shape == (H, I)
    assert experts.wrapper_gate_a.shape == experts.wrapper_up_a.shape == (E, I, 4)
    assert experts.wrapper_gate_b.shape == experts.wrapper_up_b.shape == (E, H, 4)
    assert experts.wrapper_down_a.shape == (E, H, 4)
    assert experts.wrapper_down_b.shape == (E, I, 4)


@pytest.mark.parametrize("calibrate", [False, True])
def test_full_rank_student_reproduces_teacher(teacher, input_ids, calibrate):
    student, report = compress_from_teacher(
        teacher, wrapper_rank=FULL_RANK, calibration_input_ids=input_ids if calibrate else None
    )
    student.eval()
    torch.testing.assert_close(logits(student, input_ids), logits(teacher, input_ids), atol=1e-4, rtol=0)
    assert [r["layer"] for r in report] == list(range(LAYERS))
    assert all(r["max_relative_error"] < 1e-5 and r["moe_relative_error"] < 1e-5 for r in report)
    assert all(r["inputs"] == ("calibration" if calibrate else "gaussian") for r in report)


@pytest.mark.parametrize("rank", [1, 3, 4, FULL_RANK])
def test_forward_matches_materialised_experts(rank):
    """The fast forward (grouped_mm kernel for aligned ranks, loop fallback otherwise) and its
    gradients equal a plain per-expert loop over the materialised weights."""
    torch.manual_seed(0)
    config = CompressedMoeConfig(**TINY, wrapper_rank=rank)
    model = CompressedMoeForCausalLM(config)
    experts = model.model.layers[0].mlp.experts
    x = torch.randn(20, H, requires_grad=True)
    weights, index = torch.rand(20, TOP_K).softmax(-1), torch.randint(0, E, (20, TOP_K))

    fast = experts(x, index, weights)
    fast_grads = torch.autograd.grad(fast.square().sum(), [x, *experts.parameters()])

    gate, up, down = experts.expert_weights()
    slow = torch.zeros_like(x)
    for slot in range(TOP_K):
        for j in range(E):
            rows = index[:, slot] == j
            y = (torch.nn.functional.silu(x[rows] @ gate[j].T) * (x[rows] @ up[j].T)) @ down[j].T
            slow = slow.index_add(0, rows.nonzero()[:, 0], y * weights[rows, slot, None])
    slow_grads = torch.autograd.grad(slow.square().sum(), [x, *experts.parameters()])

    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=1e-5)
    for a, b in zip(fast_grads, slow_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("layers", [None, [1]])
def test_save_and_load_with_auto_class(teacher, input_ids, tmp_path, layers):
    student, _ = compress_from_teacher(teacher, wrapper_rank=4, layers=layers)
    student.eval()
    student.save_pretrained(tmp_path)

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is CompressedMoeForCausalLM
    assert loaded.config.model_type == MODEL_TYPE
    assert loaded.config.compressed_layers == (layers or list(range(LAYERS)))
    assert loaded.config.wrapper_rank == 4 and loaded.config.core_intermediate_size == I
    assert torch.equal(logits(loaded, input_ids), logits(student, input_ids))
    assert torch.equal(
        loaded.generate(input_ids, max_new_tokens=3, do_sample=False),
        student.generate(input_ids, max_new_tokens=3, do_sample=False),
    )


def test_register_is_idempotent():
    register()
    register()
    assert type(AutoConfig.for_model(MODEL_TYPE, wrapper_rank=2, hidden_size=H)) is CompressedMoeConfig


def test_low_rank_is_smaller_and_reports_error(teacher, input_ids):
    errors = {}
    for rank in (1, 8):
        student, report = compress_from_teacher(teacher, wrapper_rank=rank, calibration_input_ids=input_ids)
        assert len(report) == LAYERS
        for entry in report:
            assert math.isfinite(entry["relative_error"]) and 0 <= entry["relative_error"] < 1
            assert entry["relative_error"] <= entry["max_relative_error"]
            assert entry["num_samples"] == input_ids.numel()
        errors[rank] = [entry["relative_error"] for entry in report]

    small, _ = compress_from_teacher(teacher, wrapper_rank=1)
    assert count_parameters(small)["total"] < count_parameters(teacher)["total"]
    assert count_parameters(small)["expert"] <= 0.5 * count_parameters(teacher)["expert"]
    assert all(e1 > e8 for e1, e8 in zip(errors[1], errors[8]))


def test_narrow_core_keeps_the_most_important_neurons(teacher):
    # Full rank at core width 8: each student expert is exactly its teacher expert pruned to 8
    # of 16 neurons, so the error is what pruning costs: clearly above zero, clearly below one.
    student, report = compress_from_teacher(teacher, wrapper_rank=8, core_intermediate_size=8)
    experts = student.model.layers[0].mlp.experts
    assert experts.shared_core.gate_proj.weight.shape == (8, H)
    assert student.config.core_intermediate_size == 8
    assert all(0.01 < entry["relative_error"] < 1 for entry in report)


def test_count_parameters(teacher):
    counts = count_parameters(teacher)
    bank = E * 3 * I * H
    assert counts["expert"] == LAYERS * bank
    assert counts["active_per_token"] == counts["total"] - LAYERS * bank + LAYERS * bank * TOP_K // E
    assert counts["non_expert"] == counts["total"] - counts["expert"]

    rank = 2
    student, _ = compress_from_teacher(teacher, wrapper_rank=rank, layers=[1])
    counts = count_parameters(student)
    # One compressed layer: the core, and three kinds of (out, r) + (in, r) wrappers per expert.
    core, wrappers = 3 * I * H, E * 3 * rank * (I + H)
    assert counts["expert"] == bank + core + wrappers
    assert counts["active_per_token"] == counts["non_expert"] + bank * TOP_K // E + core + wrappers * TOP_K // E
    assert counts["total"] == sum(p.numel() for p in student.parameters())


def test_random_init_differs_from_teacher_init(teacher):
    fitted, fitted_report = compress_from_teacher(teacher, wrapper_rank=4)
    random, random_report = compress_from_teacher(teacher, wrapper_rank=4, init="random")
    again, _ = compress_from_teacher(teacher, wrapper_rank=4, init="random")
    fitted_params, random_params = dict(fitted.named_parameters()), dict(random.named_parameters())

    for name, param in random_params.items():
        same_as_fitted = torch.equal(param, fitted_params[name])
        assert same_as_fitted != bool(re.fullmatch(".*(shared_core|wrapper).*", name)), name
        assert torch.equal(param, dict(again.named_parameters())[name]), "same seed, same student"
    assert all(r["relative_error"] > f["relative_error"] for r, f in zip(random_report, fitted_report))


def test_copy_flags(teacher):
    student, _ = compress_from_teacher(teacher, wrapper_rank=4, copy_attention=False, copy_embeddings=False)
    teacher_params = dict(teacher.named_parameters())
    for name, param in student.named_parameters():
        if name in teacher_params and not name.endswith("norm.weight"):  # norms start at ones either way
            assert not torch.equal(param, teacher_params[name]), name


def test_dense_layers_are_kept(input_ids):
    torch.manual_seed(0)
    teacher = Qwen3MoeForCausalLM(tiny_config(num_hidden_layers=3, mlp_only_layers=[0])).eval()
    student, report = compress_from_teacher(teacher, wrapper_rank=FULL_RANK)
    assert student.config.compressed_layers == [1, 2] and [r["layer"] for r in report] == [1, 2]
    torch.testing.assert_close(logits(student.eval(), input_ids), logits(teacher, input_ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(wrapper_rank=0), "wrapper_rank"),
        (dict(wrapper_rank=FULL_RANK + 1), "wrapper_rank"),
        (dict(wrapper_rank=2, layers=[LAYERS]), "layers: layer 2 is out of range"),
        (dict(wrapper_rank=2, layers=[]), "layers: is empty"),
        (dict(wrapper_rank=2, core_intermediate_size=I + 1), "core_intermediate_size"),
        (dict(wrapper_rank=2, init="zeros"), "init"),
        (dict(wrapper_rank=2, calibration_input_ids=torch.tensor([[VOCAB]])), "calibration_input_ids"),
    ],
)
def test_bad_arguments_raise_user_error(teacher, kwargs, message):
    with pytest.raises(UserError, match=re.escape(message)):
        compress_from_teacher(teacher, **kwargs)


def test_all_problems_reported_together(teacher):
    with pytest.raises(UserError) as info:
        compress_from_teacher(teacher, wrapper_rank=-1, layers=[7], init="zeros")
    assert all(key in str(info.value) for key in ("wrapper_rank:", "layers:", "init:"))


def test_non_moe_teacher_is_rejected():
    torch.manual_seed(0)
    moe_only = ("num_experts", "num_experts_per_tok", "moe_intermediate_size")
    dense_fields = {k: v for k, v in TINY.items() if k not in moe_only}
    dense = Qwen3ForCausalLM(Qwen3Config(**dense_fields))
    with pytest.raises(UserError, match="teacher: expected a Qwen3-MoE"):
        compress_from_teacher(dense, wrapper_rank=2)
    student, _ = compress_from_teacher(Qwen3MoeForCausalLM(tiny_config()), wrapper_rank=2)
    with pytest.raises(UserError, match="already a CompressedMoeForCausalLM"):
        compress_from_teacher(student, wrapper_rank=2)


def test_config_rejects_dense_layer():
    with pytest.raises(UserError, match="compressed_layers: layer 0 is a dense MLP layer"):
        CompressedMoeConfig(**TINY, mlp_only_layers=[0], compressed_layers=[0])
