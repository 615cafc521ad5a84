"""The recipe schema: every key a recipe may hold, its type, default and cross-field rules.

A recipe is the whole truth of a run. Unknown keys are refused at every level
(`extra="forbid"`), and rules that involve several keys are checked here, before
any rank starts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from sparsedist.config.sparsity import METHOD_CONFIGS, SparsityConfig


class Section(BaseModel):
    """Base of every recipe section: unknown keys and silent coercions are refused."""

    model_config = ConfigDict(extra="forbid", strict=True)


class ModelConfig(Section):
    """Which transformer to train and where its weights come from."""

    family: Literal["llama", "opt", "gpt2"]
    pretrained: Path | None = None
    """A local Hugging Face model directory; its weights initialise the run."""
    config: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of the family's transformers config class (sizes, dropout...)."""
    nominal_params: float | None = Field(None, gt=0)
    """The size the recipe promises (e.g. 1.3e9); `sparsedist plan` refuses a model 10% off it."""


MIN_BLEND_SHARE = 1e-4
"""The smallest share of a blend a part may have (the blend lays out 2^16 samples at a time)."""


class DataPart(Section):
    """One dataset of a blend: where it comes from, where it is prepared, its weight."""

    source: str
    """As `data.source`, except `embedded`."""
    dir: Path
    weight: float = Field(gt=0)
    """Relative: the part's share of the training samples is weight / the sum of the weights."""


class DataConfig(Section):
    """The token source and how samples are cut from it."""

    source: str = "embedded"
    """`embedded` (Shakespeare + Milton), a local path/glob of .txt/.jsonl files, or `hf:NAME[:CONFIG]`."""
    dir: Path = Path("data/shakespeare")
    """Where the prepared tokenizer and indexed .bin/.idx files live."""
    sources: list[DataPart] = Field(default_factory=list)
    """A weighted blend of several datasets, which replaces `source` and `dir` (a recipe can blend
    what its base names as one source; docs/recipes.md). Each part
    is prepared into its own `dir` with one tokenizer (`tokenizer`, or the one trained on the first
    part); training samples come from the parts in proportion to their weights, each part cycling
    through its own epochs; validation and one-shot calibration read the parts the same way and the
    first part, respectively."""
    seq_len: int = Field(256, gt=0)
    vocab_size: int = Field(8192, gt=0)
    valid_fraction: float = Field(0.05, gt=0, lt=1)
    """Share of whole documents held out for validation (not used by the embedded corpus)."""
    tokenizer: Path | None = None
    """An existing tokenizer directory; by default one is trained on the training split."""

    @model_validator(mode="after")
    def _one_kind_of_source(self) -> DataConfig:
        if not self.sources:
            return self
        total = sum(part.weight for part in self.sources)
        seen: set[Path] = set()
        for i, part in enumerate(self.sources):
            if part.source == "embedded":
                raise ValueError(f"data.sources.{i}.source: the embedded corpus trains its own tokenizer and "
                                 "cannot be part of a blend")
            if part.dir in seen:
                raise ValueError(f"data.sources.{i}.dir: {part.dir} is named by two parts")
            seen.add(part.dir)
            if part.weight / total < MIN_BLEND_SHARE:
                raise ValueError(f"data.sources.{i}.weight: {part.weight} is less than {MIN_BLEND_SHARE:g} of "
                                 f"the total {total:g}")
        return self

    @property
    def parts(self) -> list[DataPart]:
        """The datasets the run reads: `sources`, or `source` prepared into `dir` with weight 1."""
        return self.sources or [DataPart(source=self.source, dir=self.dir, weight=1.0)]

    @property
    def tokenizer_dir(self) -> Path:
        """The prepared tokenizer every part shares (the first part's copy)."""
        return self.parts[0].dir / "tokenizer"


class TeacherConfig(Section):
    """The distillation teacher and where it lives (docs/architecture.md: memory per placement)."""

    path: Path | Literal["self"] = "self"
    """`self`: the model the run starts from (model.pretrained); or a local HF model directory."""
    placement: Literal["sharded", "offload", "precomputed"] = "sharded"
    """`sharded`: frozen, wrapped like the student; `offload`: in host memory, moved to the device
    block by block; `precomputed`: top-k log-probabilities written to disk before training."""
    top_k: int = Field(64, gt=0)
    """precomputed: tokens kept per position (the KL misses the teacher's mass outside them)."""
    cache_dir: Path | None = None
    """precomputed: where the top-k files go; default output_dir/teacher_topk."""


class DistillConfig(Section):
    """Logit distillation from a frozen teacher: L = weight·T²·KL(teacher‖student) + (1−weight)·CE."""

    weight: float = Field(0.0, ge=0, le=1)
    """0 disables distillation."""
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    temperature: float = Field(1.0, gt=0)


class ParallelConfig(Section):
    """How the run is laid out over processes."""

    backend: Literal["fsdp2", "deepspeed", "none"] = "fsdp2"
    """`fsdp2`: fully_shard per block and on the root; `deepspeed`: ZeRO at `zero_stage`;
    `none`: one process, no sharding."""
    nnodes: int = Field(1, gt=0)
    nproc_per_node: int = Field(1, gt=0)
    mixed_precision: Literal["fp32", "bf16"] = "fp32"
    """Compute dtype; master weights, gradient reduction and optimizer state stay fp32."""
    reshard_after_forward: bool = True
    """fsdp2: free the gathered parameters of a block after its forward."""
    activation_checkpointing: bool = False
    """Keep only each block's input from the forward and recompute the block in the backward."""
    zero_stage: Literal[1, 2, 3] = 3
    """deepspeed: partition optimizer state (1), and gradients (2), and parameters (3)."""
    offload_optimizer: bool = False
    """deepspeed: keep the optimizer state and step on the CPU (ZeRO-Offload)."""
    deepspeed_config: Path | None = None
    """deepspeed: a JSON file merged over the configuration generated from the recipe."""
    _deepspeed_overrides: dict[str, Any] = PrivateAttr(default_factory=dict)

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    @property
    def deepspeed_overrides(self) -> dict[str, Any]:
        """The JSON object of `deepspeed_config`, read once when the recipe was validated ({} without one)."""
        return self._deepspeed_overrides

    @model_validator(mode="after")
    def _single_process_without_backend(self) -> ParallelConfig:
        if self.backend == "none" and self.world_size > 1:
            raise ValueError(
                f"parallel.backend: 'none' runs one process, but nnodes × nproc_per_node = {self.world_size}"
            )
        if self.deepspeed_config is not None:
            if self.backend != "deepspeed":
                raise ValueError("parallel.deepspeed_config: only used with parallel.backend 'deepspeed'")
            if not self.deepspeed_config.is_file():
                raise ValueError(f"parallel.deepspeed_config: {self.deepspeed_config} is not a file")
            try:
                override = json.loads(self.deepspeed_config.read_text())
            except ValueError as err:
                raise ValueError(f"parallel.deepspeed_config: {self.deepspeed_config} is not JSON ({err})") from None
            if not isinstance(override, dict):
                raise ValueError(f"parallel.deepspeed_config: {self.deepspeed_config} holds no JSON object")
            self._deepspeed_overrides = override
        return self


class PrecisionConfig(Section):
    """Number formats beyond the compute dtype (`parallel.mixed_precision`)."""

    fp8: bool = False
    """Per-tensor scaled FP8 products in the sparse FFN layers (e4m3 forward, e5m2 gradients):
    `torch._scaled_mm` on CUDA compute capability 8.9+, an exact emulation elsewhere."""


Beta = Annotated[float, Field(ge=0, lt=1)]


class OptimConfig(Section):
    """AdamW on fp32 master weights."""

    lr: float = Field(3e-4, gt=0)
    betas: tuple[Beta, Beta] = (0.9, 0.95)
    """Adam's decay rates of the first and second moments, each in [0, 1)."""
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    """Global gradient-norm clipping threshold; null disables clipping."""


class ScheduleConfig(Section):
    """Learning-rate schedule: linear warm-up then cosine (or constant) to min_lr_ratio × lr."""

    kind: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)


class TrainConfig(Section):
    """Length, batch geometry and outputs of the run."""

    steps: int = Field(gt=0)
    global_batch: int = Field(gt=0)
    """Sequences per optimizer step, over all ranks and micro-batches."""
    micro_batch: int = Field(gt=0)
    """Sequences per forward/backward on one rank."""
    seed: int = Field(0, ge=0, lt=2**32)
    """Seeds model initialisation, data order and sampling (numpy takes seeds below 2³²)."""
    output_dir: Path | None = None
    """Checkpoints, exported model and logs; default runs/<name>."""
    log_interval: int = Field(10, gt=0)
    max_nonfinite_steps: int = Field(3, ge=0)
    """Consecutive steps with a non-finite loss or gradient that are skipped (no update) before the run
    stops with an error; 0 stops at the first."""


class CheckpointConfig(Section):
    """Sharded DCP checkpoints, written atomically under output_dir/checkpoints."""

    interval: int = Field(100, gt=0)
    keep: int = Field(2, gt=0)
    """How many complete checkpoints to keep; older ones are deleted."""
    resume: Literal["auto", "never"] | Path = "auto"
    """`auto`: continue from the latest complete checkpoint if one exists; `never`; or a step directory."""
    export: bool = True
    """At the end, write the full model as a Hugging Face directory (output_dir/model)."""


class TrackingConfig(Section):
    """MLflow tracking, from rank 0 only."""

    enabled: bool = True
    uri: str | None = None
    """Tracking URI; default: $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db in the working directory."""
    experiment: str = "sparsedist"
    run_name: str | None = None
    peak_tflops: float | None = Field(None, gt=0)
    """Peak dense bf16 TFLOP/s of one device, for the `mfu` metric; default: known GPUs by name
    (sparsedist/tracking/mlflow_run.py), none on the CPU (no `mfu` logged)."""


class EvalConfig(Section):
    """Validation loss and perplexity on the held-out split."""

    interval: int = Field(100, gt=0)
    sequences: int | None = Field(64, gt=0)
    """The first this many validation sequences, divided between ranks; null = the whole split."""
    micro_batch: int = Field(8, gt=0)


class Recipe(Section):
    """A whole run. `base` (a parent recipe) is resolved before validation."""

    name: str
    model: ModelConfig
    data: DataConfig = Field(default_factory=DataConfig)
    sparsity: SparsityConfig = Field(default_factory=lambda: METHOD_CONFIGS["dense"](method="dense"))
    distill: DistillConfig = Field(default_factory=DistillConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    precision: PrecisionConfig = Field(default_factory=PrecisionConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        world, micro = self.parallel.world_size, self.train.micro_batch
        if self.train.global_batch % (world * micro):
            raise ValueError(
                f"train.global_batch: {self.train.global_batch} is not divisible by "
                f"world size {world} × train.micro_batch {micro}"
            )
        if self.eval.sequences is not None and self.eval.sequences % world:
            raise ValueError(f"eval.sequences: {self.eval.sequences} is not divisible by world size {world}")
        if self.schedule.warmup_steps > self.train.steps:
            raise ValueError(
                f"schedule.warmup_steps: {self.schedule.warmup_steps} exceeds train.steps ({self.train.steps})"
            )
        if self.distill.weight > 0 and self.distill.teacher.path == "self" and self.model.pretrained is None:
            raise ValueError("distill.teacher.path: 'self' needs model.pretrained (the model the run starts from)")
        if getattr(self.sparsity, "kernel", None) == "semi_structured" and self.parallel.mixed_precision == "fp32":
            raise ValueError("sparsity.kernel: semi_structured multiplies bf16 operands (cuSPARSELt, which torch "
                             "2.13 uses on every GPU, has no fp32); set parallel.mixed_precision: bf16")
        if self.precision.fp8 and self.sparsity.method == "dense":
            raise ValueError("precision.fp8: applies to the sparse FFN layers, and sparsity.method 'dense' has none")
        if self.model.pretrained is None and not self.model.config:
            raise ValueError("model.config: give the model's sizes, or model.pretrained")
        if self.train.output_dir is None:
            self.train.output_dir = Path("runs") / self.name
        if self.distill.teacher.cache_dir is None:
            self.distill.teacher.cache_dir = self.train.output_dir / "teacher_topk"
        return self
