"""The compressed MoE student: one shared expert core plus small per-expert wrappers.

A Qwen3-MoE layer holds ``E`` SwiGLU experts, each with its own ``(I, H)`` gate and up
weights and ``(H, I)`` down weight. In a *compressed* layer the student keeps one shared
SwiGLU core of width ``C`` (``core_intermediate_size``) and, for every expert ``j``, rank-``r``
deltas on each of the core's three weights::

    gate_j = W_gate + gate_a[j] @ gate_b[j].T      # (C, H) = (C, H) + (C, r) @ (r, H)
    up_j   = W_up   + up_a[j]   @ up_b[j].T        # (C, H)
    down_j = W_down + down_a[j] @ down_b[j].T      # (H, C) = (H, C) + (H, r) @ (r, C)
    expert_j(x) = down_j(silu(gate_j x) * up_j x)

Every wrapper kind is one 3D parameter ``(E, out, r)`` or ``(E, in, r)`` holding all experts.
With ``C == I`` and ``r == min(C, H)`` the deltas are full rank, so every teacher expert is
represented exactly. The forward never materialises ``E`` full matrices: the core's gate/up
run once per token, the deltas per (token, expert) pair as ``(x @ b_j) @ a_j.T``, and the
core's down projection once per token on the routing-weighted sum of intermediate states.

Parameter names: the core's contain ``shared_core`` (``model.layers.0.mlp.experts.shared_core.
gate_proj.weight``), the wrappers' contain ``wrapper`` (``model.layers.0.mlp.experts.
wrapper_gate_a``), everything else (attention, norms, router ``mlp.gate.weight``, embeddings,
``lm_head``, uncompressed expert banks) has the teacher's names and neither word.

Importing this module registers the model with ``AutoConfig`` / ``AutoModelForCausalLM``, so
a saved student loads with plain ``AutoModelForCausalLM.from_pretrained(path)``.
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, Qwen3MoeConfig
from transformers import initialization as hf_init
from transformers.activations import ACT2FN
from transformers.models.qwen3_moe.modeling_qwen3_moe import (
    Qwen3MoeDecoderLayer,
    Qwen3MoeExperts,
    Qwen3MoeForCausalLM,
    Qwen3MoeModel,
    Qwen3MoePreTrainedModel,
    Qwen3MoeRMSNorm,
    Qwen3MoeRotaryEmbedding,
    Qwen3MoeSparseMoeBlock,
)

from kdsweep.errors import UserError
from kdsweep.models import load_causal_lm

MODEL_TYPE = "kdsweep_compressed_moe"

# Sample tokens per layer for fitting and the error report; caps their time and memory.
MAX_SAMPLE_TOKENS = 4096
GAUSSIAN_SAMPLE_TOKENS = 1024
CALIBRATION_BATCH = 16

__all__ = [
    "CompressedExperts",
    "CompressedMoeConfig",
    "CompressedMoeForCausalLM",
    "CompressedMoeModel",
    "compress_from_teacher",
    "count_parameters",
    "moe_layer_indices",
    "register",
]


def moe_layer_indices(config: Qwen3MoeConfig) -> list[int]:
    """Indices of the layers that are sparse MoE blocks (not dense MLPs) under ``config``.

    Same rule as ``Qwen3MoeDecoderLayer``: a layer is MoE unless it is in ``mlp_only_layers``,
    ``num_experts`` is 0, or ``(index + 1)`` is not a multiple of ``decoder_sparse_step``.
    """
    mlp_only = set(config.mlp_only_layers or [])
    return [
        i
        for i in range(config.num_hidden_layers)
        if i not in mlp_only and config.num_experts > 0 and (i + 1) % config.decoder_sparse_step == 0
    ]


def _layer_problems(layers: list[int], config: Qwen3MoeConfig, name: str) -> list[str]:
    moe_layers = moe_layer_indices(config)
    problems = []
    for i in layers:
        if not isinstance(i, int) or isinstance(i, bool):
            problems.append(f"{name}: layer indices must be integers, got {i!r}")
        elif not 0 <= i < config.num_hidden_layers:
            problems.append(
                f"{name}: layer {i} is out of range; the model has layers 0..{config.num_hidden_layers - 1}"
            )
        elif i not in moe_layers:
            problems.append(
                f"{name}: layer {i} is a dense MLP layer (mlp_only_layers / decoder_sparse_step), "
                f"only MoE layers can be compressed: choose from {moe_layers}"
            )
    return problems


@strict
class CompressedMoeConfig(Qwen3MoeConfig):
    r"""Configuration of :class:`CompressedMoeForCausalLM`: a Qwen3-MoE config plus three fields.

    core_intermediate_size (`int`, *optional*):
        Width ``C`` of the shared core SwiGLU and so of every expert in a compressed layer.
        Defaults to ``moe_intermediate_size``.
    wrapper_rank (`int`, *optional*, defaults to 8):
        Rank ``r`` of each per-expert delta, ``1 <= r <= min(core_intermediate_size, hidden_size)``;
        the upper bound is full rank.
    compressed_layers (`list[int]`, *optional*):
        MoE layers whose experts are replaced by core + wrappers; ``None`` means every MoE
        layer (resolved to the explicit list, which is what ``config.json`` stores).
    """

    model_type = MODEL_TYPE

    core_intermediate_size: int | None = None
    wrapper_rank: int = 8
    compressed_layers: list[int] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.core_intermediate_size is None:
            self.core_intermediate_size = self.moe_intermediate_size
        if self.compressed_layers is None:
            self.compressed_layers = moe_layer_indices(self)
        self.compressed_layers = sorted(set(self.compressed_layers))

        problems = _layer_problems(self.compressed_layers, self, "compressed_layers")
        if self.core_intermediate_size < 1:
            problems.append(f"core_intermediate_size: must be >= 1, got {self.core_intermediate_size}")
        full_rank = min(self.core_intermediate_size, self.hidden_size)
        if not 1 <= self.wrapper_rank <= full_rank:
            problems.append(
                f"wrapper_rank: must be between 1 and min(core_intermediate_size, hidden_size) = {full_rank} "
                f"(full rank), got {self.wrapper_rank}"
            )
        if problems:
            raise UserError("invalid CompressedMoeConfig:\n  " + "\n  ".join(problems))


def _aligned_for_grouped_mm(t: torch.Tensor) -> bool:
    # The CPU kernel of torch.nn.functional.grouped_mm needs each matrix's leading stride (and
    # the batch stride) to be a multiple of 16 bytes: a rank-1 or rank-6 wrapper in fp32 fails.
    size = t.element_size()
    if t.stride(-1) == 1:
        lead = t.stride(-2)
    elif t.stride(-2) == 1:
        lead = t.stride(-1)
    else:
        return False
    return t.data_ptr() % 16 == 0 and all((s * size) % 16 == 0 for s in (lead, *t.stride()[:-2]))


def _grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Per-group matmul: rows ``offsets[j-1]:offsets[j]`` of ``x`` (S, K) times ``w[j]`` (K, N)."""
    use_kernel = (
        hasattr(F, "grouped_mm")
        and x.device.type == "cpu"
        and _aligned_for_grouped_mm(x)
        and _aligned_for_grouped_mm(w)
    )
    if use_kernel:
        return F.grouped_mm(x, w, offs=offsets)
    outs, start = [], 0
    for j, end in enumerate(offsets.tolist()):
        outs.append(x[start:end] @ w[j])
        start = end
    return torch.cat(outs)


class SharedCoreFFN(nn.Module):
    """The SwiGLU every expert of a compressed layer starts from: ``down(silu(gate x) * up x)``."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)


class CompressedExperts(nn.Module):
    """Drop-in replacement of ``Qwen3MoeExperts``: a shared core plus rank-r deltas per expert.

    Shapes (E experts, H hidden, C core width, r rank); expert ``j`` uses
    ``W + a[j] @ b[j].T`` for each of the core's gate, up and down weights:

    - ``shared_core.{gate,up}_proj.weight``: (C, H); ``shared_core.down_proj.weight``: (H, C)
    - ``wrapper_gate_a``, ``wrapper_up_a``: (E, C, r); ``wrapper_gate_b``, ``wrapper_up_b``: (E, H, r)
    - ``wrapper_down_a``: (E, H, r); ``wrapper_down_b``: (E, C, r)
    """

    def __init__(self, config: CompressedMoeConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.core_intermediate_size
        self.rank = config.wrapper_rank
        E, H, C, r = self.num_experts, self.hidden_dim, self.intermediate_dim, self.rank
        self.shared_core = SharedCoreFFN(H, C)
        self.wrapper_gate_a = nn.Parameter(torch.empty(E, C, r))
        self.wrapper_gate_b = nn.Parameter(torch.empty(E, H, r))
        self.wrapper_up_a = nn.Parameter(torch.empty(E, C, r))
        self.wrapper_up_b = nn.Parameter(torch.empty(E, H, r))
        self.wrapper_down_a = nn.Parameter(torch.empty(E, H, r))
        self.wrapper_down_b = nn.Parameter(torch.empty(E, C, r))
        self.act_fn = ACT2FN[config.hidden_act]

    def wrapper_parameters(self) -> list[nn.Parameter]:
        """The six wrapper tensors, in a fixed order."""
        return [
            self.wrapper_gate_a,
            self.wrapper_gate_b,
            self.wrapper_up_a,
            self.wrapper_up_b,
            self.wrapper_down_a,
            self.wrapper_down_b,
        ]

    def expert_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Materialised per-expert weights ``gate`` (E, C, H), ``up`` (E, C, H), ``down`` (E, H, C).

        For inspection and error reports only; the forward never builds them.
        """
        core = self.shared_core
        gate = core.gate_proj.weight + self.wrapper_gate_a @ self.wrapper_gate_b.transpose(1, 2)
        up = core.up_proj.weight + self.wrapper_up_a @ self.wrapper_up_b.transpose(1, 2)
        down = core.down_proj.weight + self.wrapper_down_a @ self.wrapper_down_b.transpose(1, 2)
        return gate, up, down

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """Mix of the chosen experts' outputs.

        Args:
            hidden_states: (N, H) tokens.
            top_k_index: (N, k) chosen expert ids.
            top_k_weights: (N, k) routing weights.

        Returns:
            (N, H) ``sum_k weight_k * expert_{index_k}(x)``, as ``Qwen3MoeExperts`` returns.
        """
        num_tokens, k = top_k_index.shape
        core = self.shared_core
        r, width = self.rank, self.intermediate_dim

        # The core's gate/up are shared, so they run once per token rather than once per pair.
        core_gate_up = F.linear(hidden_states, torch.cat([core.gate_proj.weight, core.up_proj.weight]))  # (N, 2C)

        # Sort the S = N*k (token, expert) pairs by expert so each expert's rows are contiguous.
        expert_ids, perm = torch.sort(top_k_index.reshape(-1))
        token_of_pair = perm // k
        counts = torch.bincount(expert_ids, minlength=self.num_experts)
        offsets = torch.cumsum(counts, dim=0).to(torch.int32)
        pair_weights = top_k_weights.reshape(-1)[perm].to(hidden_states.dtype)

        # index_select/index_add rather than fancy indexing: their backward passes are each
        # other, 1.3x faster on CPU for the whole block than the index_put of x[idx]'s backward.
        x = hidden_states.index_select(0, token_of_pair)  # (S, H)
        z = _grouped_mm(x, torch.cat([self.wrapper_gate_b, self.wrapper_up_b], dim=2), offsets)  # (S, 2r)
        gate_up = core_gate_up.index_select(0, token_of_pair)  # (S, 2C)
        gate = gate_up[:, :width] + _grouped_mm(z[:, :r], self.wrapper_gate_a.transpose(1, 2), offsets)
        up = gate_up[:, width:] + _grouped_mm(z[:, r:], self.wrapper_up_a.transpose(1, 2), offsets)
        h = self.act_fn(gate) * up * pair_weights[:, None]  # (S, C), already routing-weighted

        # Down is linear in h: sum each token's weighted h first, then apply the core once.
        h_per_token = h.new_zeros(num_tokens, width).index_add(0, token_of_pair, h)  # (N, C)
        out = F.linear(h_per_token, core.down_proj.weight)  # (N, H)
        delta = _grouped_mm(_grouped_mm(h, self.wrapper_down_b, offsets), self.wrapper_down_a.transpose(1, 2), offsets)
        return out.index_add(0, token_of_pair, delta.to(out.dtype))


class CompressedMoePreTrainedModel(Qwen3MoePreTrainedModel):
    """Qwen3-MoE pretrained-model base with the compressed config and wrapper initialisation."""

    config: CompressedMoeConfig
    config_class = CompressedMoeConfig

    def _init_weights(self, module):
        super()._init_weights(module)
        # The core's nn.Linear layers get the standard normal(initializer_range) from super().
        if isinstance(module, CompressedExperts):
            for p in module.wrapper_parameters():
                hf_init.normal_(p, mean=0.0, std=self.config.initializer_range)


class CompressedMoeModel(CompressedMoePreTrainedModel, Qwen3MoeModel):
    """``Qwen3MoeModel`` whose ``config.compressed_layers`` use :class:`CompressedExperts`."""

    def __init__(self, config: CompressedMoeConfig):
        # Qwen3MoeModel.__init__ is skipped on purpose: it would initialise full expert banks
        # that are thrown away. This repeats its body with the experts swapped before post_init.
        PreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [Qwen3MoeDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        for layer_idx in config.compressed_layers:
            self.layers[layer_idx].mlp.experts = CompressedExperts(config)
        self.norm = Qwen3MoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen3MoeRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class CompressedMoeForCausalLM(CompressedMoePreTrainedModel, Qwen3MoeForCausalLM):
    """Causal LM with compressed MoE layers; forward, generation and saving are Qwen3-MoE's."""

    def __init__(self, config: CompressedMoeConfig):
        # Same as Qwen3MoeForCausalLM.__init__ with CompressedMoeModel as the backbone.
        PreTrainedModel.__init__(self, config)
        self.model = CompressedMoeModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.router_aux_loss_coef = config.router_aux_loss_coef
        self.num_experts = config.num_experts
        self.num_experts_per_tok = config.num_experts_per_tok
        self.post_init()


def register() -> None:
    """Register the config and model with the Auto classes; safe to call any number of times.

    Runs at import of :mod:`kdsweep.compress`, so afterwards
    ``AutoModelForCausalLM.from_pretrained(path)`` loads a saved student (no trust_remote_code).
    """
    AutoConfig.register(MODEL_TYPE, CompressedMoeConfig, exist_ok=True)
    AutoModelForCausalLM.register(CompressedMoeConfig, CompressedMoeForCausalLM, exist_ok=True)


register()


def load_student(path: str | Path, **kwargs) -> PreTrainedModel:
    """A saved student (compressed or plain) through ``AutoModelForCausalLM``, its class registered above."""
    return load_causal_lm(path, **kwargs)


# ----------------------------------------------------------------------------------------
# Initialising a student from a teacher
# ----------------------------------------------------------------------------------------


def _check_teacher(teacher) -> None:
    if isinstance(teacher, CompressedMoeForCausalLM):
        raise UserError("teacher: is already a CompressedMoeForCausalLM; pass the original Qwen3-MoE teacher")
    config = getattr(teacher, "config", None)
    if not isinstance(config, Qwen3MoeConfig) or not hasattr(getattr(teacher, "model", None), "layers"):
        raise UserError(
            f"teacher: expected a Qwen3-MoE causal LM (Qwen3MoeForCausalLM, model_type 'qwen3_moe'), "
            f"got {type(teacher).__name__}"
            + (f" with model_type {config.model_type!r}" if config is not None else "")
            + "; load the teacher with AutoModelForCausalLM.from_pretrained on a Qwen3-MoE checkpoint"
        )
    for i in moe_layer_indices(config):
        mlp = teacher.model.layers[i].mlp
        if not isinstance(mlp, Qwen3MoeSparseMoeBlock) or not isinstance(mlp.experts, Qwen3MoeExperts):
            raise UserError(
                f"teacher: layer {i} should hold Qwen3MoeSparseMoeBlock / Qwen3MoeExperts but holds "
                f"{type(mlp).__name__}; pass an unmodified Qwen3-MoE teacher"
            )


def _argument_problems(
    config: Qwen3MoeConfig,
    wrapper_rank,
    core_intermediate_size,
    layers,
    init: str,
    calibration_input_ids,
) -> list[str]:
    problems = []
    intermediate = config.moe_intermediate_size
    core = intermediate if core_intermediate_size is None else core_intermediate_size
    if not isinstance(core, int) or not 1 <= core <= intermediate:
        problems.append(
            f"core_intermediate_size: must be an integer between 1 and the teacher's "
            f"moe_intermediate_size = {intermediate} (or None for {intermediate}), got {core!r}"
        )
        core = intermediate
    full_rank = min(core, config.hidden_size)
    if not isinstance(wrapper_rank, int) or not 1 <= wrapper_rank <= full_rank:
        problems.append(
            f"wrapper_rank: must be an integer between 1 and min(core_intermediate_size, hidden_size) = "
            f"{full_rank} (full rank), got {wrapper_rank!r}"
        )
    if layers is not None:
        if len(layers) == 0:
            problems.append(f"layers: is empty; pass None to compress every MoE layer {moe_layer_indices(config)}")
        problems += _layer_problems(list(layers), config, "layers")
    if init not in ("teacher", "random"):
        problems.append(f"init: must be 'teacher' or 'random', got {init!r}")
    if calibration_input_ids is not None:
        ids = calibration_input_ids
        if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dim() not in (1, 2):
            problems.append(
                "calibration_input_ids: must be an integer tensor of token ids, shape (batch, seq) or (seq,)"
            )
        elif ids.numel() == 0:
            problems.append("calibration_input_ids: is empty; pass some token ids or None for Gaussian inputs")
        elif int(ids.min()) < 0 or int(ids.max()) >= config.vocab_size:
            problems.append(
                f"calibration_input_ids: ids must lie in 0..{config.vocab_size - 1} (the teacher's vocab), "
                f"got {int(ids.min())}..{int(ids.max())}"
            )
    return problems


@torch.no_grad()
def _sample_expert_inputs(
    teacher: Qwen3MoeForCausalLM,
    layers: list[int],
    calibration_input_ids: torch.Tensor | None,
    generator: torch.Generator,
) -> dict[int, torch.Tensor]:
    """(n, H) float32 inputs of each layer's experts: captured on calibration text, or Gaussian."""
    param = next(teacher.parameters())
    if calibration_input_ids is None:
        samples = {}
        for i in layers:
            # The experts see the output of post_attention_layernorm: unit RMS times the norm weight.
            norm_weight = teacher.model.layers[i].post_attention_layernorm.weight.float().cpu()
            z = torch.randn(GAUSSIAN_SAMPLE_TOKENS, teacher.config.hidden_size, generator=generator)
            samples[i] = (z * norm_weight).to(param.device)
        return samples

    ids = calibration_input_ids
    if ids.dim() == 1:
        ids = ids[None]
    captured: dict[int, list[torch.Tensor]] = {i: [] for i in layers}

    def capture(layer_idx):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            captured[layer_idx].append(hidden.detach().float().reshape(-1, hidden.shape[-1]))

        return hook

    handles = [
        teacher.model.layers[i].mlp.experts.register_forward_pre_hook(capture(i), with_kwargs=True) for i in layers
    ]
    was_training = teacher.training
    teacher.eval()
    try:
        for start in range(0, ids.shape[0], CALIBRATION_BATCH):
            teacher(input_ids=ids[start : start + CALIBRATION_BATCH].to(param.device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        teacher.train(was_training)

    samples = {}
    for i in layers:
        x = torch.cat(captured[i])
        if x.shape[0] > MAX_SAMPLE_TOKENS:
            keep = torch.randperm(x.shape[0], generator=generator)[:MAX_SAMPLE_TOKENS]
            x = x[keep.to(x.device)]
        samples[i] = x
    return samples


def _swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """(n, H) inputs through one expert's (I, H) gate/up weights -> (n, I) intermediate states."""
    return F.silu(x @ gate.T) * (x @ up.T)


def _teacher_expert_weights(experts: Qwen3MoeExperts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher bank as float64 gate (E, I, H), up (E, I, H), down (E, H, I)."""
    gate, up = experts.gate_up_proj.detach().double().chunk(2, dim=1)
    return gate, up, experts.down_proj.detach().double()


def _low_rank(residual: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r truncated SVD of each (out, in) slice of ``residual`` (E, out, in) as ``a @ b.T``.

    ``residual[j] = U S V^T``; ``a = U_r sqrt(S_r)`` (E, out, r), ``b = V_r sqrt(S_r)`` (E, in, r).
    Splitting sqrt(S) evenly gives both factors the same scale, which keeps their gradients
    balanced when the student is trained.
    """
    if residual.device.type == "cpu":
        # MKL's threaded SVD slowed 50-100x (8 x 256 x 256: 0.1 s -> 8-11 s) while another
        # process held one of the two cores; single-threaded it stayed at 0.1-0.25 s.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            u, s, vh = torch.linalg.svd(residual, full_matrices=False)
        finally:
            torch.set_num_threads(threads)
    else:
        u, s, vh = torch.linalg.svd(residual, full_matrices=False)
    root = s[:, :rank].sqrt()
    a = u[:, :, :rank] * root[:, None, :]
    b = vh[:, :rank, :].transpose(1, 2) * root[:, None, :]
    return a, b


@torch.no_grad()
def _fit_from_teacher(teacher_experts: Qwen3MoeExperts, student_experts: CompressedExperts, x: torch.Tensor) -> None:
    """Set the core to the mean of the (pruned) teacher experts and the wrappers to their residuals."""
    gate, up, down = _teacher_expert_weights(teacher_experts)
    width = student_experts.intermediate_dim
    if width < gate.shape[1]:
        # Keep each expert's `width` most important neurons: mean |silu(g_i x) * u_i x| on the
        # sample inputs times the norm of the neuron's down column (its share of the output).
        importance = torch.stack(
            [_swiglu(x.double(), gate[j], up[j]).abs().mean(0) * down[j].norm(dim=0) for j in range(gate.shape[0])]
        )  # (E, I)
        keep = importance.topk(width, dim=1).indices.sort(dim=1).values  # (E, C)
        gate = torch.gather(gate, 1, keep[:, :, None].expand(-1, -1, gate.shape[2]))
        up = torch.gather(up, 1, keep[:, :, None].expand(-1, -1, up.shape[2]))
        down = torch.gather(down, 2, keep[:, None, :].expand(-1, down.shape[1], -1))

    core = student_experts.shared_core
    rank = student_experts.rank
    for weight, core_linear, a_param, b_param in (
        (gate, core.gate_proj, student_experts.wrapper_gate_a, student_experts.wrapper_gate_b),
        (up, core.up_proj, student_experts.wrapper_up_a, student_experts.wrapper_up_b),
        (down, core.down_proj, student_experts.wrapper_down_a, student_experts.wrapper_down_b),
    ):
        mean = weight.mean(dim=0)
        a, b = _low_rank(weight - mean, rank)
        core_linear.weight.copy_(mean)
        a_param.copy_(a)
        b_param.copy_(b)


@torch.no_grad()
def _reconstruction_report(
    layer_idx: int,
    teacher_block: Qwen3MoeSparseMoeBlock,
    student_experts: CompressedExperts,
    x: torch.Tensor,
    source: str,
) -> dict:
    t_gate, t_up, t_down = _teacher_expert_weights(teacher_block.experts)
    s_gate, s_up, s_down = (w.double() for w in student_experts.expert_weights())
    xd = x.double()
    per_expert = []
    for j in range(t_gate.shape[0]):  # one expert at a time bounds memory to (n, max(I, H))
        y_teacher = _swiglu(xd, t_gate[j], t_up[j]) @ t_down[j].T  # (n, H)
        y_student = _swiglu(xd, s_gate[j], s_up[j]) @ s_down[j].T
        per_expert.append((y_student - y_teacher).norm() / y_teacher.norm().clamp_min(1e-30))
    per_expert = torch.stack(per_expert)

    # The whole block as the model uses it: the teacher's routing, top-k mixing, real forwards.
    dtype = teacher_block.experts.down_proj.dtype
    _, weights, index = teacher_block.gate(x.to(dtype))
    moe_teacher = teacher_block.experts(x.to(dtype), index, weights).double()
    moe_student = student_experts(x.to(dtype), index, weights).double()
    moe_error = (moe_student - moe_teacher).norm() / moe_teacher.norm().clamp_min(1e-30)
    return {
        "layer": layer_idx,
        "relative_error": float(per_expert.mean()),
        "max_relative_error": float(per_expert.max()),
        "moe_relative_error": float(moe_error),
        "num_samples": int(x.shape[0]),
        "inputs": source,
    }


def _student_config(tconfig, wrapper_rank: int, core_intermediate_size: int | None, layers: list[int] | None):
    """The student's config: the teacher's, plus the core width, the wrapper rank and the compressed layers."""
    fields = {
        key: value
        for key, value in tconfig.to_dict().items()
        if key not in ("model_type", "architectures", "transformers_version", "_name_or_path")
    }
    fields.update(
        core_intermediate_size=core_intermediate_size or tconfig.moe_intermediate_size,
        wrapper_rank=wrapper_rank,
        compressed_layers=None if layers is None else sorted(set(layers)),
    )
    config = CompressedMoeConfig(**fields)
    config._attn_implementation = tconfig._attn_implementation
    return config


@torch.no_grad()
def _copy_from_teacher(student, teacher, *, copy_attention: bool, copy_embeddings: bool, copy_uncompressed: bool):
    """Copy the teacher's weights the student keeps as they are (see :func:`compress_from_teacher`'s arguments)."""
    if copy_embeddings:
        student.model.embed_tokens.load_state_dict(teacher.model.embed_tokens.state_dict())
        student.model.norm.load_state_dict(teacher.model.norm.state_dict())
        student.lm_head.load_state_dict(teacher.lm_head.state_dict())
    for i, (s_layer, t_layer) in enumerate(zip(student.model.layers, teacher.model.layers)):
        is_moe = isinstance(t_layer.mlp, Qwen3MoeSparseMoeBlock)
        if copy_attention:
            s_layer.self_attn.load_state_dict(t_layer.self_attn.state_dict())
            s_layer.input_layernorm.load_state_dict(t_layer.input_layernorm.state_dict())
            s_layer.post_attention_layernorm.load_state_dict(t_layer.post_attention_layernorm.state_dict())
            if is_moe:
                s_layer.mlp.gate.load_state_dict(t_layer.mlp.gate.state_dict())
        if copy_uncompressed and i not in student.config.compressed_layers:
            # Uncompressed expert banks and dense MLPs are the teacher's own.
            target = s_layer.mlp.experts if is_moe else s_layer.mlp
            source = t_layer.mlp.experts if is_moe else t_layer.mlp
            target.load_state_dict(source.state_dict())


def _fit_compressed_layers(teacher, student, calibration_input_ids, seed: int, *, fit: bool) -> list[dict]:
    """Fit each compressed layer's core and wrappers to the teacher's experts (if ``fit``); one report per layer."""
    layers = student.config.compressed_layers
    generator = torch.Generator().manual_seed(seed)
    samples = _sample_expert_inputs(teacher, layers, calibration_input_ids, generator)
    source = "gaussian" if calibration_input_ids is None else "calibration"
    report = []
    for i in layers:
        teacher_block = teacher.model.layers[i].mlp
        student_experts = student.model.layers[i].mlp.experts
        if fit:
            _fit_from_teacher(teacher_block.experts, student_experts, samples[i])
        report.append(_reconstruction_report(i, teacher_block, student_experts, samples[i], source))
    return report


def compress_from_teacher(
    teacher: Qwen3MoeForCausalLM,
    *,
    wrapper_rank: int,
    core_intermediate_size: int | None = None,
    layers: list[int] | None = None,
    copy_attention: bool = True,
    copy_embeddings: bool = True,
    init: str = "teacher",
    calibration_input_ids: torch.Tensor | None = None,
    seed: int = 0,
) -> tuple[CompressedMoeForCausalLM, list[dict]]:
    """Build a :class:`CompressedMoeForCausalLM` student from a Qwen3-MoE teacher.

    Args:
        teacher: a ``Qwen3MoeForCausalLM`` (left unchanged).
        wrapper_rank: rank ``r`` of the per-expert deltas, ``1..min(C, H)``; ``min(C, H)`` is full rank.
        core_intermediate_size: core width ``C``, ``1..moe_intermediate_size``; None = the teacher's.
        layers: MoE layers to compress; None = every MoE layer. Others keep the teacher's bank.
        copy_attention: copy attention, both layer norms and the router (``mlp.gate``) of every
            layer from the teacher; otherwise they keep the student's random initialisation.
        copy_embeddings: copy ``embed_tokens``, the final norm and ``lm_head``; otherwise random.
        init: ``"teacher"`` fits the compressed experts to the teacher's and copies uncompressed
            expert banks and dense MLPs; ``"random"`` leaves all of them at the standard random
            init (normal, std ``initializer_range``): the same-shape random baseline.
        calibration_input_ids: (batch, seq) token ids. If given, each compressed layer's expert
            inputs are captured from a teacher forward (at most 4096 tokens kept per layer);
            otherwise Gaussian inputs with the scale of the experts' real inputs (unit RMS times
            ``post_attention_layernorm.weight``) are used.
        seed: seeds the student's random initialisation and the sampling; the global RNG is left alone.

    Returns:
        ``(student, report)``; the student has the teacher's dtype and device. ``report`` has one
        dict per compressed layer: ``layer``; ``relative_error`` and ``max_relative_error``, the mean
        and max over experts of ``||y_student_j(X) - y_teacher_j(X)||_F / ||y_teacher_j(X)||_F`` on
        the sample inputs X (every sample through every expert); ``moe_relative_error``, the same
        ratio for the whole block with the teacher's top-k routing; ``num_samples``; ``inputs``
        (``"calibration"`` or ``"gaussian"``).

    Initialisation with ``init="teacher"``:

    - If ``C < I``, each expert is first pruned to its ``C`` most important intermediate neurons
      (mean ``|silu(g_i x) * u_i x|`` on the sample inputs times ``||down[:, i]||``): a neuron is
      gate row + up row + down column, so pruning keeps the expert a valid SwiGLU of width C.
    - The core is the mean of the (pruned) experts' weights, the least-squares choice when the
      wrappers carry nothing. Averaging is only as meaningful as the neurons' alignment across
      experts: an upcycled MoE shares it, one trained from scratch does not, and no permutation
      matching is attempted; the wrappers then carry most of each expert.
    - Each wrapper is the rank-r truncated SVD of ``W_j - W_core`` = ``U S V^T``:
      ``a_j = U_r sqrt(S_r)``, ``b_j = V_r sqrt(S_r)``, so ``W_core + a_j b_j^T`` is the best
      rank-r approximation of ``W_j`` around the core (exact at full rank when ``C == I``).

    Raises:
        UserError: the teacher is not a Qwen3-MoE model, or an argument is out of range; every
            problem is listed, each naming its argument.
    """
    _check_teacher(teacher)
    tconfig = teacher.config
    problems = _argument_problems(tconfig, wrapper_rank, core_intermediate_size, layers, init, calibration_input_ids)
    if problems:
        raise UserError("compress_from_teacher: invalid arguments:\n  " + "\n  ".join(problems))

    config = _student_config(tconfig, wrapper_rank, core_intermediate_size, layers)
    param = next(teacher.parameters())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = CompressedMoeForCausalLM(config)
    student.to(device=param.device, dtype=param.dtype)
    student.train(teacher.training)
    _copy_from_teacher(
        student,
        teacher,
        copy_attention=copy_attention,
        copy_embeddings=copy_embeddings,
        copy_uncompressed=init == "teacher",
    )

    return student, _fit_compressed_layers(teacher, student, calibration_input_ids, seed, fit=init == "teacher")


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter counts of a Qwen3-MoE or compressed MoE model (shared/tied tensors counted once).

    Returns:
        ``total``: all parameters.
        ``expert``: parameters in expert banks (``Qwen3MoeExperts``) and in compressed layers'
        cores and wrappers; routers and dense MLP layers are not expert parameters.
        ``active_per_token``: what one token uses: every non-expert parameter (embeddings
        included), ``top_k / E`` of each expert bank, and for a compressed layer the whole
        core plus ``top_k`` of the ``E`` per-expert wrappers.
        ``non_expert``: ``total - expert``.
    """
    total = sum(p.numel() for p in model.parameters())
    top_k = getattr(getattr(model, "config", None), "num_experts_per_tok", 0)
    expert = active_expert = 0
    for module in model.modules():
        if isinstance(module, Qwen3MoeExperts):
            bank = sum(p.numel() for p in module.parameters())
            expert += bank
            active_expert += bank // module.num_experts * min(top_k, module.num_experts)
        elif isinstance(module, CompressedExperts):
            core = sum(p.numel() for p in module.shared_core.parameters())
            wrappers = sum(p.numel() for p in module.wrapper_parameters())
            expert += core + wrappers
            active_expert += core + wrappers // module.num_experts * min(top_k, module.num_experts)
    return {
        "total": total,
        "expert": expert,
        "active_per_token": total - expert + active_expert,
        "non_expert": total - expert,
    }
