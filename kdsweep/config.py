"""The typed schema of ``params.yaml``, validated once, with errors that name the key.

``params.yaml`` has one section per pipeline stage (see ``dvc.yaml``):

========================  ==========================  =============================
section                   read by stage               what it controls
========================  ==========================  =============================
``dataset``               prepare                     the corpus and how it is packed
``tokenizer``             prepare                     the locally trained BPE
``teacher``               teacher, teacher_logits,    which teacher, how the embedded
                          distill, evaluate           one is trained, the logit cache
``student``               student                     how the student is derived
``loss``                  distill, evaluate           alpha, temperature, KL mode
``training``              distill                     the optimisation loop
``parameter_lr_multipliers``  distill                 regex -> LR multiplier (0 freezes)
``stages``                distill                     training phases (freeze, then unfreeze)
``evaluate``              evaluate                    the final evaluation
========================  ==========================  =============================

Every field's ``description`` documents it (README.md's params section is the users' copy).
Defaults live here *and* in the shipped ``params.yaml``; a test keeps them in sync.
"""

from __future__ import annotations

import copy
import difflib
import re
from collections.abc import Iterable
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from kdsweep.errors import UserError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- dataset
class DatasetConfig(_Section):
    source: Literal["builtin", "hf", "files"] = Field(
        "builtin",
        description="builtin: Python's own documentation text (offline, no download); "
        "hf: a Hugging Face dataset (`name`, `config_name`, `split`, `text_column`); "
        "files: local UTF-8 text files listed in `files`.",
    )
    name: str | None = Field(None, description="Hugging Face dataset id or local dataset directory (source: hf).")
    config_name: str | None = Field(None, description="Hugging Face dataset configuration, e.g. wikitext-2-raw-v1.")
    split: str = Field("train", description="Split the training text is read from (source: hf).")
    validation_split: str | None = Field(
        None,
        description="Split the validation text is read from (source: hf). If null, "
        "`validation_fraction` of the documents are held out instead.",
    )
    test_split: str | None = Field(
        None,
        description="Split the held-out test text is read from (source: hf), e.g. `test`. If null, "
        "`test_fraction` of the documents are held out instead. Only `evaluate` reads the test split.",
    )
    text_column: str = Field("text", description="Column holding the text (source: hf).")
    files: list[str] = Field(default_factory=list, description="Text files, one document per file (source: files).")
    max_length: int = Field(128, ge=8, description="Tokens per packed training sequence.")
    max_samples: int | None = Field(None, ge=1, description="Use at most this many documents; null = all.")
    validation_fraction: float = Field(0.1, gt=0, lt=1, description="Share of documents held out for validation.")
    test_fraction: float = Field(
        0.1,
        gt=0,
        lt=1,
        validate_default=True,  # the sum check below must also see the default
        description="Share of documents held out for the test split (disjoint from train and validation, "
        "split by document before packing, seeded by `seed`); only `evaluate` reads it.",
    )
    seed: int = Field(0, description="Seed of the document split.")

    @model_validator(mode="after")
    def _source_fields(self) -> DatasetConfig:
        if self.source == "hf" and not self.name:
            raise ValueError("source 'hf' needs `name` (a Hugging Face dataset id)")
        if self.source == "files" and not self.files:
            raise ValueError("source 'files' needs `files` (a list of text files)")
        return self

    @field_validator("validation_split", "test_split")
    @classmethod
    def _named_split(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return value
        fraction = info.field_name.replace("_split", "_fraction")
        source = info.data.get("source")
        if source is not None and source != "hf":
            raise ValueError(
                f"a named split is read only with source 'hf', not {source!r}; set it to null and use "
                f"dataset.{fraction} to hold out documents"
            )
        others = {"split": info.data.get("split"), "validation_split": info.data.get("validation_split")}
        for key, other in others.items():
            if key != info.field_name and value == other:
                raise ValueError(
                    f"{value!r} is also dataset.{key}; the splits must be disjoint: name another split, "
                    f"or set it to null to hold out dataset.{fraction} of the documents"
                )
        return value

    @field_validator("test_fraction")
    @classmethod
    def _fractions_leave_training_data(cls, value: float, info: ValidationInfo) -> float:
        val = None if info.data.get("validation_split") else info.data.get("validation_fraction")
        if val is not None and not info.data.get("test_split") and val + value >= 1:
            raise ValueError(
                f"dataset.validation_fraction {val} + dataset.test_fraction {value} = {val + value:g} leaves no "
                "documents for training; the two must sum to less than 1"
            )
        return value


class TokenizerConfig(_Section):
    vocab_size: int = Field(
        4096,
        ge=300,
        le=65536,
        description="Vocabulary of the byte-level BPE trained on the corpus. "
        "Ignored when `teacher.model` names a model: its own tokenizer is used.",
    )
    min_frequency: int = Field(1, ge=1, description="Minimum pair frequency for a BPE merge.")


# --------------------------------------------------------------------------- teacher
class TeacherArchConfig(_Section):
    """Shape of the embedded Qwen3-MoE teacher that the pipeline trains itself."""

    hidden_size: int = Field(256, ge=8)
    num_hidden_layers: int = Field(4, ge=1)
    num_attention_heads: int = Field(4, ge=1)
    num_key_value_heads: int = Field(2, ge=1)
    head_dim: int = Field(64, ge=4)
    num_experts: int = Field(8, ge=1)
    num_experts_per_tok: int = Field(2, ge=1)
    moe_intermediate_size: int = Field(256, ge=4)

    @model_validator(mode="after")
    def _heads(self) -> TeacherArchConfig:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError("num_experts_per_tok must be <= num_experts")
        return self


class TeacherTrainConfig(_Section):
    """How long and how fast the embedded teacher is trained (bounded, CPU friendly)."""

    max_steps: int = Field(400, ge=1)
    batch_size: int = Field(8, ge=1)
    learning_rate: float = Field(3e-3, gt=0)
    warmup_steps: int = Field(15, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    seed: int = 0


class TeacherConfig(_Section):
    model: str | None = Field(
        None,
        description="Hugging Face model id or local directory of the teacher (nothing is trained). "
        "null = train the embedded Qwen3-MoE teacher on the corpus.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of `model`.")
    trust_remote_code: bool = Field(False, description="Allow the model repository's own Python code. Off by default.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype the teacher runs in; auto = bfloat16 on a GPU that supports it, else float32."
    )
    device_map: Literal["auto"] | None = Field(
        None,
        description="null: the teacher on one device; auto: spread over every visible device (transformers / "
        "Accelerate big-model loading) for a teacher bigger than one device, when writing the cache and for a "
        "live teacher in a one-process distill.",
    )
    arch: TeacherArchConfig = Field(default_factory=TeacherArchConfig)
    train: TeacherTrainConfig = Field(default_factory=TeacherTrainConfig)
    use_cached_logits: bool = Field(
        True, description="Distill from the HDF5 top-k cache (true) or run the teacher live in every step (false)."
    )
    top_k: int = Field(64, ge=1, description="Teacher logits kept per position in the cache.")
    cache_batch_size: int = Field(8, ge=1, description="Sequences per teacher forward when writing the cache.")
    cache_devices: int = Field(
        1,
        ge=1,
        description="Processes that write the cache, one per GPU (on a CPU machine: N processes), each a shard, "
        "merged at the end; `kdsweep cache generate --devices N` overrides it.",
    )
    temperature_range: tuple[float, float] = Field(
        (1.0, 4.0),
        description="KD temperatures the cache supports exactly: the cache stores the full-vocabulary "
        "log-normaliser on a grid over this range. Any `loss.temperature` must lie inside it.",
    )
    temperature_grid: int = Field(
        8,
        ge=2,
        le=64,
        description="Grid points over `temperature_range` of the stored tail log-normaliser; 8 keeps the "
        "normaliser within ~4e-4 (log space) of exact for the teachers measured (docs/cache-format.md).",
    )
    cache_compression: Literal["gzip", "none"] = Field(
        "gzip",
        description="gzip: shuffle + gzip level 4, ~54% of the raw size; none: no compression, ~1.8x larger "
        "files that read 2-3x faster (BENCHMARKS.md). Both keep every float16 value and a checksum per chunk.",
    )
    cache_mode: Literal["topk", "sampled"] = Field(
        "topk",
        description="topk: each position keeps the teacher's top_k tokens (loss.mode topk_tail or topk_renorm); "
        "sampled: it keeps the unique tokens of sample_draws draws from the teacher at sample_temperature, "
        "with their counts (loss.mode sampled, an unbiased estimate of the teacher; docs/cache-format.md).",
    )
    cache_values: Literal["fp16", "q8"] = Field(
        "fp16",
        description="How the kept logits are stored: fp16 (every float16 value, format version 2) or q8 "
        "(8 bits each, square-law companding over each position's range; the writer stores the measured "
        "probability error, which `kdsweep cache verify` checks).",
    )
    sample_draws: int = Field(
        64, ge=1, le=255, description="cache_mode sampled: tokens drawn per position (with replacement)."
    )
    sample_temperature: float = Field(
        1.0,
        gt=0,
        description="cache_mode sampled: the proposal temperature the tokens are drawn at; a sampling "
        "temperature, not the KD temperature (loss.temperature). Must lie in temperature_range: the loss "
        "importance-weights the draws when the two differ.",
    )
    sample_weights: Literal["exact", "self_normalized"] = Field(
        "exact",
        description="cache_mode sampled: how the loss weights the draws at a KD temperature T. exact: the "
        "cache stores the log-normaliser on temperature_range's grid (exact weights, T in range); "
        "self_normalized: it stores log q at the sampled ids and no grid (~15-21 bytes/token less), "
        "any T > 0, weights normalised over the draws: exact at T = sample_temperature, biased "
        "(consistent in sample_draws) elsewhere (docs/cache-format.md).",
    )

    @field_validator("temperature_range")
    @classmethod
    def _range(cls, v: tuple[float, float]) -> tuple[float, float]:
        lo, hi = v
        if not (0 < lo <= hi):
            raise ValueError(f"must be [low, high] with 0 < low <= high, got [{lo}, {hi}]")
        return v

    @model_validator(mode="after")
    def _proposal_in_range(self) -> TeacherConfig:
        lo, hi = self.temperature_range
        if self.cache_mode == "sampled" and self.sample_weights == "exact" and not lo <= self.sample_temperature <= hi:
            raise ValueError(
                f"teacher.sample_temperature: {self.sample_temperature} is outside teacher.temperature_range "
                f"[{lo}, {hi}]; the loss needs the teacher's probabilities at the proposal temperature: "
                "widen the range or pick a sample_temperature in it"
            )
        return self


# --------------------------------------------------------------------------- student
class StudentConfig(_Section):
    kind: Literal["compressed", "copy"] = Field(
        "compressed",
        description="compressed: replace each MoE layer's experts by a shared core plus low-rank "
        "per-expert wrappers fitted to the teacher; copy: the teacher's own architecture.",
    )
    init: Literal["teacher", "random"] = Field(
        "teacher", description="teacher: weights fitted to / copied from the teacher; random: fresh initialisation."
    )
    wrapper_rank: int = Field(1, ge=1, description="Rank of each expert's wrapper (compressed only).")
    core_intermediate_size: int | None = Field(
        16, ge=1, description="Width of the shared core FFN; null = the teacher's expert width."
    )
    layers: list[int] | None = Field(None, description="MoE layers to compress; null = all.")
    copy_attention: bool = Field(True, description="Copy attention, norms and router weights from the teacher.")
    copy_embeddings: bool = Field(True, description="Copy the embeddings and LM head from the teacher.")
    calibration_sequences: int = Field(32, ge=0, description="Training sequences used to measure reconstruction error.")
    eval_sequences: int = Field(64, ge=1, description="Validation sequences for the size/quality report.")
    seed: int = 0


# --------------------------------------------------------------------------- loss
class KDPositionsConfig(_Section):
    fraction: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Share f of each sequence's real positions the KD term covers (CE covers all); "
        "1 = every position. The KD term is averaged over the selected positions.",
    )
    by: Literal["student_entropy"] = Field(
        "student_entropy",
        description="student_entropy: the ceil(f * n) positions where the student's own distribution "
        "(temperature 1, detached) has the highest entropy, chosen afresh at every step (SE-KD).",
    )


class LossConfig(_Section):
    alpha: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Weight of the KD term: total = (1 - alpha) * CE + alpha * T^2 * KL.",
    )
    temperature: float = Field(
        2.0,
        gt=0,
        description="KD temperature T: both distributions are softened as softmax(logits / T). "
        "Unrelated to any sampling temperature.",
    )
    kl_reduction: Literal["batchmean"] = Field(
        "batchmean",
        description="batchmean: KL summed over the vocabulary and averaged over real target tokens "
        "of the whole accumulated batch (padding excluded).",
    )
    mode: Literal["topk_tail", "topk_renorm", "dense", "sampled"] = Field(
        "topk_tail",
        description="topk_tail: k + 1 buckets (top-k plus one tail bucket) on both sides, exact given the cache; "
        "topk_renorm: teacher renormalised over its top-k (common, biased); "
        "dense: full vocabulary (live teacher only); "
        "sampled: the unbiased random-sampling estimate from a teacher.cache_mode sampled cache (forward only).",
    )
    direction: Literal["forward", "reverse", "jsd"] = Field(
        "forward",
        description="forward: KL(teacher || student); reverse: KL(student || teacher); jsd: generalised "
        "Jensen-Shannon, jsd_beta * KL(teacher || m) + (1 - jsd_beta) * KL(student || m), "
        "m = jsd_beta * teacher + (1 - jsd_beta) * student.",
    )
    jsd_beta: float = Field(0.5, gt=0, lt=1, description="Weight beta of direction jsd (0.5 = symmetric JSD).")
    scale_by_t2: bool = Field(
        True,
        description="Multiply the KL term by T^2 so its gradient scale does not shrink as T grows (Hinton et al.).",
    )
    chunk_size: int = Field(
        256,
        ge=1,
        description="Tokens per chunk of the LM head + loss; the loss holds about 4 x chunk_size x vocabulary "
        "float32 values at a time (256 x 151,936: ~0.6 GB).",
    )
    kd_positions: KDPositionsConfig = Field(
        default_factory=KDPositionsConfig,
        description="Which positions the KD term covers (position selection); the cache's bytes are unchanged.",
    )


# --------------------------------------------------------------------------- training
class TrainingConfig(_Section):
    num_train_epochs: float = Field(2, gt=0, description="Passes over the training sequences (if max_steps is null).")
    max_steps: int | None = Field(48, ge=1, description="Optimizer steps; overrides num_train_epochs.")
    train_sequences: int | None = Field(
        16,
        ge=1,
        description="Distil on the first N sequences of the training split (the documents are shuffled by "
        "dataset.seed before the split), repeated as epochs: the data a run may see; null = the whole split. "
        "The embedded default's 16 is limited data on purpose (BENCHMARKS.md); set null for your own.",
    )
    per_device_train_batch_size: int = Field(
        4,
        ge=1,
        description="Sequences per micro-batch on each rank: a micro-batch holds this x the number of torchrun "
        "processes (1 without torchrun).",
    )
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="Effective batch = per_device_train_batch_size x processes x accumulation."
    )
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="Under torchrun: ddp = a whole student on each device, gradients averaged; fsdp = FSDP2 "
        "fully_shard per decoder layer, for students that do not fit on one device. Ignored in one process.",
    )
    learning_rate: float = Field(5e-4, gt=0, description="Base learning rate; each group gets base x multiplier.")
    warmup_steps: int = Field(6, ge=0)
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final LR as a fraction of the peak (cosine, linear).")
    weight_decay: float = Field(0.01, ge=0)
    default_lr_multiplier: float = Field(
        1.0,
        ge=0,
        description="LR multiplier of parameters no parameter_lr_multipliers pattern matches; 0 freezes them.",
    )
    weight_decay_on_norms_biases_embeddings: bool = Field(
        False, description="Apply weight decay to norms, biases and embeddings too."
    )
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.95, ge=0, lt=1)
    bf16: bool = Field(False, description="bf16 autocast with fp32 master weights (GPU or recent CPU).")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping; null = off.")
    gradient_checkpointing: bool = False
    logging_steps: int = Field(16, ge=1, description="Console line and TensorBoard scalars every N steps.")
    eval_steps: int = Field(16, ge=1, description="Validation every N steps (reported to the sweep's pruner).")
    eval_max_batches: int | None = Field(
        None, ge=1, description="Cap on validation batches per evaluation; null = all."
    )
    save_steps: int | None = Field(
        None, ge=1, description="Periodic checkpoint every N steps; null = only the final one."
    )
    max_nonfinite_steps: int = Field(10, ge=1, description="Stop after this many non-finite losses in a row.")
    dataloader_num_workers: int = Field(0, ge=0)
    seed: int = 0
    deterministic: bool = Field(False, description="torch.use_deterministic_algorithms(True).")
    threads: int | None = Field(None, ge=1, description="torch CPU threads; null = torch's default.")


def check_regex(pattern: str) -> str:
    """A field validator: the pattern must compile (reported with the regex error)."""
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"invalid regular expression {pattern!r}: {e}") from None
    return pattern


RegexPattern = Annotated[str, AfterValidator(check_regex)]


class LRMultiplier(_Section):
    pattern: RegexPattern = Field(
        description="Regular expression matched against the full parameter name (re.fullmatch)."
    )
    lr_multiplier: float = Field(ge=0, description="Learning rate = base x multiplier; 0 freezes the parameter.")


# The reference's "Recommended Starting Point" (compressed experts at full LR, pre-trained
# embeddings and norms more conservatively).
REFERENCE_MULTIPLIERS = [
    (".*shared_core.*", 1.0),
    (".*wrapper.*", 1.0),
    (".*embed_tokens.*|.*lm_head.*", 0.1),
    (".*norm.*", 0.5),
]


class PhaseConfig(_Section):
    """One training phase: an entry of ``stages.configs`` (the key keeps the reference's name)."""

    stage_name: str = Field(description="The phase's name, in the console, TensorBoard and the checkpoint.")
    num_epochs: float | None = Field(None, gt=0)
    max_steps: int | None = Field(None, ge=1)
    parameter_lr_multipliers: list[LRMultiplier] | None = Field(
        None, description="This phase's multipliers; null = the top-level list."
    )
    default_lr_multiplier: float | None = Field(
        None,
        ge=0,
        description="Multiplier of parameters no rule matches in this phase; null = training.default_lr_multiplier.",
    )
    learning_rate: float | None = Field(None, gt=0)
    alpha: float | None = Field(None, ge=0, le=1)
    temperature: float | None = Field(None, gt=0)
    warmup_steps: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _length(self) -> PhaseConfig:
        if (self.num_epochs is None) == (self.max_steps is None):
            raise ValueError(f"phase {self.stage_name!r} needs exactly one of num_epochs or max_steps")
        return self


class PhasesConfig(_Section):
    """Section ``stages``: training phases run one after the other (e.g. freeze, then unfreeze)."""

    enabled: bool = False
    configs: list[PhaseConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _nonempty(self) -> PhasesConfig:
        if self.enabled and not self.configs:
            raise ValueError("stages.enabled is true but stages.configs is empty")
        names = [s.stage_name for s in self.configs]
        if len(set(names)) != len(names):
            raise ValueError(f"phase names (stage_name) must be unique, got {names}")
        return self


class EvaluateConfig(_Section):
    batch_size: int = Field(16, ge=1)
    max_batches: int | None = Field(
        None, ge=1, description="Evaluate at most this many batches of each split (validation and test)."
    )


class Params(_Section):
    """The whole of ``params.yaml``."""

    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    parameter_lr_multipliers: list[LRMultiplier] = Field(
        default_factory=lambda: [LRMultiplier(pattern=p, lr_multiplier=m) for p, m in REFERENCE_MULTIPLIERS],
        description="Ordered regex -> LR multiplier rules; first full match wins; 0 freezes.",
    )
    stages: PhasesConfig = Field(default_factory=PhasesConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

    def cross_problems(self) -> list[str]:
        """Problems that involve more than one key (checked once every key is valid on its own)."""
        problems = []
        lo, hi = self.teacher.temperature_range
        temps = [("loss.temperature", self.loss.temperature)]
        temps += [
            (f"stages.configs.{i}.temperature", s.temperature)
            for i, s in enumerate(self.stages.configs)
            if s.temperature is not None
        ]
        # A self-normalised sampled cache stores no normaliser grid: every T > 0 is served.
        any_t = self.teacher.cache_mode == "sampled" and self.teacher.sample_weights == "self_normalized"
        if self.teacher.use_cached_logits:
            for key, t in temps if not any_t else []:
                if not lo <= t <= hi:
                    problems.append(
                        f"{key}: {t} is outside teacher.temperature_range [{lo}, {hi}] that the logit cache "
                        f"supports; widen teacher.temperature_range (regenerates the cache) or pick T in range"
                    )
            if self.loss.mode == "dense":
                problems.append(
                    "loss.mode: 'dense' needs the full teacher distribution: set teacher.use_cached_logits: false "
                    "or use loss.mode topk_tail"
                )
        return problems + cache_mode_problems(self.teacher, self.loss)


def cache_mode_problems(teacher: TeacherConfig, loss: LossConfig) -> list[str]:
    """How ``loss.mode`` and ``teacher.cache_mode`` must pair (each problem names the keys)."""
    if loss.mode == "sampled" and not teacher.use_cached_logits:
        return [
            "loss.mode: 'sampled' reads a sampled cache, but teacher.use_cached_logits is false; set it to true "
            "(with teacher.cache_mode: sampled), or use loss.mode dense or topk_tail with a live teacher"
        ]
    if not teacher.use_cached_logits:
        return []
    problems = []
    if loss.mode == "sampled" and teacher.cache_mode != "sampled":
        problems.append(
            "loss.mode: 'sampled' needs teacher.cache_mode: sampled (got 'topk'); set teacher.cache_mode: sampled, "
            "or use loss.mode topk_tail"
        )
    if loss.mode in ("topk_tail", "topk_renorm") and teacher.cache_mode == "sampled":
        problems.append(
            f"loss.mode: {loss.mode!r} needs a top-k cache, but teacher.cache_mode is 'sampled'; use loss.mode "
            "sampled, or set teacher.cache_mode: topk"
        )
    if teacher.sample_weights == "self_normalized" and teacher.cache_mode != "sampled":
        problems.append(
            "teacher.sample_weights: 'self_normalized' weighs the draws of a sampled cache, but teacher.cache_mode "
            "is 'topk'; set teacher.cache_mode: sampled (with loss.mode sampled), or sample_weights: exact"
        )
    if loss.mode == "sampled" and loss.direction != "forward":
        problems.append(
            f"loss.direction: {loss.direction!r} with loss.mode 'sampled': the sampled estimate is unbiased for "
            "the forward KL only; set loss.direction: forward"
        )
    return problems


# --------------------------------------------------------------------------- loading
def shape_of(annotation: Any) -> tuple[str, Any]:
    """What a field annotation holds: ``("model", M)``, ``("list", item)``, ``("dict", value)``,
    ``("union", members)`` or ``("value", annotation)``. ``Annotated`` and ``| None`` are looked through."""
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "model", annotation
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (list, tuple, set):
        return "list", args[0] if args else Any
    if origin is dict:
        return "dict", args[1] if args else Any
    if origin in (Union, UnionType):
        members = [a for a in args if a is not type(None)]
        return shape_of(members[0]) if len(members) == 1 else ("union", members)
    return "value", annotation


def _union_tags(member: Any) -> set[Any]:
    """The tags pydantic names a union member by in error locations: its ``Tag``, else its Literal fields' values."""
    if get_origin(member) is Annotated:
        tags = {m.tag for m in get_args(member)[1:] if isinstance(m, Tag)}
        if tags:
            return tags
    kind, model = shape_of(member)
    if kind != "model":
        return set()
    return {
        v for f in model.model_fields.values() if get_origin(f.annotation) is Literal for v in get_args(f.annotation)
    }


def annotation_at(root: Any, loc: Iterable[Any]) -> tuple[Any, list[str]]:
    """Follow ``loc`` (a pydantic error location, or the parts of a dotted key) from the type ``root``.

    Returns the annotation reached (None once the path leaves the types) and the parts a user
    wrote: the tags pydantic adds for a union member (``sampler.tpe.seed``) are left out.
    """
    annotation, written = root, []
    for part in loc:
        kind, inner = shape_of(annotation) if annotation is not None else ("value", None)
        if kind == "union":  # pydantic's error location names the member here, the user did not
            annotation = next((m for m in inner if part in _union_tags(m)), None)
            continue
        written.append(str(part))
        if kind == "model":
            annotation = inner.model_fields[part].annotation if part in inner.model_fields else None
        else:
            annotation = inner if kind in ("list", "dict") else None
    return annotation, written


def problem_lines(err: ValidationError, root: Any, prefix: str = "") -> list[str]:
    """One line per problem, each starting with its dotted path (below ``prefix``) in the file
    that ``root`` (a model, or any annotation) describes; unknown keys get a "did you mean"."""
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        path = ".".join([prefix] * bool(prefix) + annotation_at(root, loc)[1])
        kind = e["type"]
        if kind == "extra_forbidden":
            where = shape_of(annotation_at(root, loc[:-1])[0])
            known = list(where[1].model_fields) if where[0] == "model" else []
            close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
            hint = f"; did you mean `{close[0]}`?" if close else (f"; known keys: {', '.join(known)}" if known else "")
            lines.append(f"  {path}: unknown key{hint}")
        elif kind == "missing":
            lines.append(f"  {path}: required key is missing")
        elif kind == "union_tag_not_found":
            union = shape_of(annotation_at(root, loc)[0])
            tags = [str(t) for m in union[1] for t in _union_tags(m)] if union[0] == "union" else []
            field = str(e.get("ctx", {}).get("discriminator", "type")).strip("'")
            lines.append(f"  {path}: needs `{field}:`" + (f" (one of {', '.join(tags)})" if tags else ""))
        elif kind == "union_tag_invalid":
            expected = re.findall(r"'([a-z_]+)'", e["ctx"].get("expected_tags", "")) if e.get("ctx") else []
            tag = str(e.get("ctx", {}).get("tag", ""))
            close = difflib.get_close_matches(tag, expected, n=1, cutoff=0.5)
            hint = f"; did you mean `{close[0]}`?" if close else f"; known: {', '.join(expected)}"
            lines.append(f"  {path}.type: unknown type {tag!r}{hint}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = e.get("input")
            hide = isinstance(got, (dict, list)) or "got" in msg or repr(got) in msg
            # Checks on a whole file already start with the dotted key.
            lines.append(f"  {path}: {msg}" + ("" if hide else f" (got {got!r})") if path else f"  {msg}")
    return list(dict.fromkeys(lines))


def _without(data: dict, locs: list[tuple]) -> dict:
    """A copy of ``data`` with the keys at ``locs`` removed (a whole list if an item is bad),
    so the rest can be validated and cross-checked too."""
    data = copy.deepcopy(data)
    for loc in locs:
        node, path = data, list(loc)
        for i, part in enumerate(path):
            if isinstance(node, dict) and part in node:
                if i == len(path) - 1 or isinstance(node[part], list):
                    del node[part]
                    break
                node = node[part]
            else:
                break
    return data


def validate(data: Any, model: type[BaseModel] = Params, source: str = "params.yaml") -> Any:
    """Validate a parsed YAML mapping against ``model``; raise :class:`UserError` listing every problem.

    Cross-key checks (``cross_problems``) also run when some keys are invalid: those keys
    are dropped (their defaults stand in) so that one run reports everything.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{source}: the top level must be a mapping of sections, got {type(data).__name__}")
    lines: list[str] = []
    try:
        obj = model.model_validate(data)
    except ValidationError as err:
        lines = problem_lines(err, model)
        try:
            obj = model.model_validate(_without(data, [tuple(e["loc"]) for e in err.errors()]))
        except ValidationError:
            obj = None
    if obj is not None and hasattr(obj, "cross_problems"):
        lines += [f"  {p}" for p in obj.cross_problems()]
    if lines:
        n = len(lines)
        raise UserError(f"{source}: {n} problem{'s' if n > 1 else ''}:\n" + "\n".join(lines))
    return obj


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key written twice in one mapping is an error
    (PyYAML keeps the last silently, so an edit of the first copy would do nothing)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (lines {seen[key]} and {line})", key_node.start_mark
                )
            seen.setdefault(key, line)
        return super().construct_mapping(node, deep)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's error in one line: what, and where."""
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    what = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"{where}{what}"


def parse_yaml(text: str, source: str | Path) -> Any:
    """Parse YAML text with the safe loader, rejecting duplicate keys; a :class:`UserError` naming
    ``source`` (the file) and the line when it is not valid YAML."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: safe
    except yaml.YAMLError as e:
        raise UserError(f"{source}: not valid YAML ({_yaml_problem(e)}); fix that line") from None


def read_text_file(path: str | Path, missing: str) -> str:
    """The UTF-8 text of ``path``; a missing, unreadable or binary file is a :class:`UserError`
    naming it (``missing`` is the fix shown for a missing file)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found ({missing})")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not a text file (byte {e.start} is not UTF-8); it must be YAML") from None
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror}); check its permissions") from None


def read_yaml(path: str | Path, missing: str = "run from the repository root, or pass --params PATH") -> Any:
    """Parse a YAML file with the safe loader (duplicate keys rejected); a missing, binary or
    malformed file is a :class:`UserError`.

    ``missing`` is the hint shown when the file does not exist: the caller knows the fix.
    """
    return parse_yaml(read_text_file(path, missing), path)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``params.yaml`` (an empty file is an error: every stage would run on defaults)."""
    return validate(nonempty(read_yaml(path), path), Params, str(path))


def nonempty(data: Any, source: str | Path) -> Any:
    """``data`` parsed from ``source``, which must not be empty (no document, or only comments)."""
    if data is None:
        raise UserError(f"{source}: the file is empty; write its sections, or restore it: `git checkout -- {source}`")
    return data
