"""Regex learning-rate multipliers (kdsweep.param_groups) on a real tiny Qwen3-MoE model."""

import pytest
import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from kdsweep.errors import UserError
from kdsweep.param_groups import assign_groups, build_param_groups, format_assignment

BASE_LR = 1e-3
NORM = r".*norm.*"


@pytest.fixture
def model() -> Qwen3MoeForCausalLM:
    torch.manual_seed(0)
    return Qwen3MoeForCausalLM(
        Qwen3MoeConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            moe_intermediate_size=8,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            num_experts=4,
            num_experts_per_tok=2,
        )
    )


def named_numel(model) -> list[tuple[str, int]]:
    return [(n, p.numel()) for n, p in model.named_parameters()]


def group_of(plan, name: str):
    (group,) = [g for g in plan.groups if name in g.names]
    return group


def test_every_parameter_is_in_exactly_one_group(model):
    plan = assign_groups(named_numel(model), [(NORM, 0.5), (r".*embed_tokens.*|.*lm_head.*", 0.1)])
    names = [n for g in plan.groups for n in g.names]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert sum(g.numel for g in plan.groups) == sum(p.numel() for p in model.parameters())


def test_first_matching_rule_wins(model):
    layer0 = r"model\.layers\.0\..*"
    plan = assign_groups(named_numel(model), [(NORM, 0.5), (layer0, 2.0)])
    mult = plan.multiplier_of()
    assert mult["model.layers.0.input_layernorm.weight"] == 0.5
    assert mult["model.layers.0.self_attn.q_norm.weight"] == 0.5
    assert mult["model.layers.0.self_attn.q_proj.weight"] == 2.0
    assert mult["model.layers.1.self_attn.q_proj.weight"] == 1.0

    swapped = assign_groups(named_numel(model), [(layer0, 2.0), (NORM, 0.5)]).multiplier_of()
    assert swapped["model.layers.0.input_layernorm.weight"] == 2.0
    assert swapped["model.layers.1.input_layernorm.weight"] == 0.5


def test_patterns_must_match_the_full_name(model):
    assert assign_groups(named_numel(model), [(r"lm_head\.weight", 0.1)]).multiplier_of()["lm_head.weight"] == 0.1
    with pytest.raises(UserError, match="'lm_head' matches no parameter"):  # only a prefix of the name
        assign_groups(named_numel(model), [(r"lm_head", 0.1)])


def test_unmatched_parameters_get_the_default(model):
    plan = assign_groups(named_numel(model), [(NORM, 0.5)])
    default = group_of(plan, "lm_head.weight")
    assert default.pattern == "(default)" and default.multiplier == 1.0
    assert "model.embed_tokens.weight" in default.names
    assert not any("norm" in n for n in default.names)

    plan = assign_groups(named_numel(model), [(NORM, 0.5)], default_multiplier=0.25)
    assert group_of(plan, "lm_head.weight").multiplier == 0.25


def test_multiplier_zero_freezes_and_leaves_the_optimizer(model):
    plan = assign_groups(named_numel(model), [(r".*embed_tokens.*", 0.0), (NORM, 0.5)])
    groups = build_param_groups(model, plan, BASE_LR, weight_decay=0.1)
    in_groups = {id(p) for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        frozen = name == "model.embed_tokens.weight"
        assert p.requires_grad is not frozen, name
        assert (id(p) in in_groups) is not frozen, name
    assert len(in_groups) == sum(len(g["params"]) for g in groups)  # no parameter twice
    torch.optim.AdamW(groups)  # the groups are valid optimizer input


def test_effective_lr_is_base_times_multiplier(model):
    plan = assign_groups(named_numel(model), [(NORM, 0.5), (r".*embed_tokens.*|.*lm_head.*", 0.1)])
    groups = build_param_groups(model, plan, BASE_LR, weight_decay=0.1)
    assert {g["name"] for g in groups} == {NORM, r".*embed_tokens.*|.*lm_head.*", "(default)"}
    for g in groups:
        assert g["lr_multiplier"] == {NORM: 0.5, "(default)": 1.0}.get(g["name"], 0.1)
        assert g["lr"] == pytest.approx(BASE_LR * g["lr_multiplier"])
    opt = torch.optim.AdamW(groups, lr=123.0)
    assert sorted(g["lr"] for g in opt.param_groups) == pytest.approx(
        sorted(BASE_LR * g["lr_multiplier"] for g in groups)
    )


def _decay_of(model, groups) -> dict[str, float]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {by_id[id(p)]: g["weight_decay"] for g in groups for p in g["params"]}


def test_no_weight_decay_on_norms_biases_embeddings(model):
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(64))  # a bias to check as well
    plan = assign_groups(named_numel(model), [(NORM, 0.5)])
    decay = _decay_of(model, build_param_groups(model, plan, BASE_LR, weight_decay=0.1))
    assert len(decay) == len(list(model.parameters()))
    for name in (
        "model.embed_tokens.weight",
        "model.norm.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.1.self_attn.k_norm.weight",
        "lm_head.bias",
    ):
        assert decay[name] == 0.0, name
    for name in (
        "lm_head.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.mlp.experts.gate_up_proj",
        "model.layers.0.mlp.gate.weight",
    ):
        assert decay[name] == 0.1, name

    everything = _decay_of(model, build_param_groups(model, plan, BASE_LR, weight_decay=0.1, decay_everything=True))
    assert set(everything.values()) == {0.1}


def test_pattern_matching_nothing_is_an_error_with_suggestions(model):
    """The reference's `.*layer\\.0\\..*` misses Hugging Face's `model.layers.0.` names."""
    pattern = r".*layer\.0\..*"
    with pytest.raises(UserError) as info:
        assign_groups(named_numel(model), [(NORM, 0.5), (pattern, 0.0), (r".*emb_tokens.*", 0.1)])
    msg = str(info.value)
    assert "parameter_lr_multipliers.1.pattern" in msg and repr(pattern) in msg
    assert "layers" in msg and "model.layers.0." in msg  # the hint and a close name
    # Every problem is reported at once, each with its own suggestion.
    assert "parameter_lr_multipliers.2.pattern" in msg and "model.embed_tokens.weight" in msg
    assert "parameter_lr_multipliers.0" not in msg


def test_where_names_the_config_key(model):
    with pytest.raises(UserError, match=r"stages\.configs\.0\.parameter_lr_multipliers\.0\.pattern"):
        assign_groups(named_numel(model), [(r"nothing", 1.0)], where="stages.configs.0.parameter_lr_multipliers")


def test_shadowed_pattern_is_reported(model):
    shadowed = r".*input_layernorm.*"
    plan = assign_groups(named_numel(model), [(NORM, 0.5), (shadowed, 2.0)])
    assert plan.shadowed == [shadowed]
    assert shadowed not in [g.pattern for g in plan.groups]
    warnings = [line for line in format_assignment(plan, BASE_LR).splitlines() if line.startswith("warning")]
    assert len(warnings) == 1 and repr(shadowed) in warnings[0] and "shadowed" in warnings[0]

    partly = assign_groups(named_numel(model), [(r".*layers\.0\.input_layernorm.*", 0.5), (NORM, 2.0)])
    assert partly.shadowed == []
    assert "warning" not in format_assignment(partly, BASE_LR)


def test_freezing_everything_is_an_error(model):
    with pytest.raises(UserError, match="nothing would train"):
        assign_groups(named_numel(model), [(r".*", 0.0)])
    with pytest.raises(UserError, match="nothing would train"):
        assign_groups(named_numel(model), [(NORM, 0.0)], default_multiplier=0.0)


def test_format_assignment_table(model):
    plan = assign_groups(named_numel(model), [(NORM, 0.5), (r".*embed_tokens.*", 0.0)])
    lines = format_assignment(plan, BASE_LR).splitlines()
    assert lines[0].split() == ["pattern", "tensors", "parameters", "lr"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    norm = group_of(plan, "model.norm.weight")
    assert rows[NORM] == [str(len(norm.names)), f"{norm.numel:,}", "0.0005"]
    assert rows[r".*embed_tokens.*"] == ["1", "1,024", "frozen"]
    default = group_of(plan, "lm_head.weight")
    assert rows["(default)"] == [str(len(default.names)), f"{default.numel:,}", "0.001"]
    assert len(rows) == 3


def test_default_multiplier_zero_freezes_unmatched_and_is_named_when_nothing_trains(model):
    plan = assign_groups(named_numel(model), [(NORM, 0.5)], default_multiplier=0.0)
    groups = build_param_groups(model, plan, BASE_LR, weight_decay=0.1)
    trained = {id(p) for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in trained) is ("norm" in name) and p.requires_grad is ("norm" in name), name
    assert "(default)" in format_assignment(plan, BASE_LR) and "frozen" in format_assignment(plan, BASE_LR)
    with pytest.raises(UserError, match=r"unmatched parameters get the default 0 \(training.default_lr_multiplier\)"):
        assign_groups(named_numel(model), [(NORM, 0.0)], default_multiplier=0.0)
