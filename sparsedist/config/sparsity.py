"""The `sparsity` section: one config class per method, selected by `sparsity.method`.

Each method's keys and defaults are the paper's; a key another method has is refused.
Defaults cite methods.md (../shared/design) and the papers.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Targets = Literal["ffn", "all_linear"]


class _Method(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    n: int = Field(2, gt=0)
    m: int = Field(4, gt=0)
    targets: Targets = "ffn"
    """`ffn`: the MLP linears of every block; `all_linear`: attention too. Embeddings and lm_head stay dense."""
    oneshot: Literal["none", "magnitude", "wanda", "sparsegpt", "alps"] = "none"
    """Prune the starting weights one-shot before training (block by block on calibration data)."""
    calibration_sequences: int = Field(128, gt=0)
    """Training-split sequences (of data.seq_len tokens) that calibrate wanda, sparsegpt and alps."""

    @model_validator(mode="after")
    def _n_below_m(self):
        if self.n >= self.m:
            raise ValueError(f"sparsity.n: {self.n} must be smaller than sparsity.m ({self.m})")
        return self


class _SparseForward(_Method):
    """Methods whose forward multiplies an N:M weight, so a 2:4 kernel can run it."""

    kernel: Literal["masked_dense", "semi_structured"] = "masked_dense"
    """The FFN layers' product: the masked dense product, or PyTorch's 2:4 semi-structured kernel
    (cuSPARSELt/CUTLASS on CUDA compute capability 8.0+; the masked dense product elsewhere)."""
    kernel_min_features: int = Field(1024, ge=0)
    """FFN layers whose smaller dimension is below this keep the masked dense product."""

    @model_validator(mode="after")
    def _kernel_two_four(self):
        if self.kernel == "semi_structured" and (self.n, self.m) != (2, 4):
            raise ValueError(f"sparsity.kernel: semi_structured needs the 2:4 pattern, not {self.n}:{self.m}")
        return self


class Dense(_Method):
    """No masks."""

    method: Literal["dense"]


class STE(_SparseForward):
    """Magnitude masks, forward with M⊙W, gradient straight through to W."""

    method: Literal["ste"]
    refresh_interval: int = Field(1, gt=0)
    """Recompute masks from |W| every this many optimizer steps."""


class SRSTE(STE):
    """STE plus SR-STE's masked decay (Zhou et al. 2021)."""

    method: Literal["srste"]
    decay: float = Field(2e-4, ge=0)
    """λ_W: λ(1−M)⊙W added to the gradient after the reduction over ranks and after clipping."""


class _TwoFour(_SparseForward):
    """Methods defined for the 2:4 pattern only."""

    @model_validator(mode="after")
    def _two_four(self):
        if (self.n, self.m) != (2, 4):
            raise ValueError(f"sparsity.n: {self.method} is defined for 2:4 (n=2, m=4), not {self.n}:{self.m}")
        return self


class SparsePretrain(_TwoFour):
    """ICML'24 (Hu et al.): transposable masks, masked decay on gradients, MVUE, dense fine-tuning."""

    method: Literal["sparse_pretrain"]
    refresh_interval: int = Field(40, gt=0)
    """Transposable masks are recomputed every 40 optimizer steps."""
    decay: float = Field(6e-5, ge=0)
    """α: α(1−M)⊙W added to the fp32 gradient after clipping (6e-5 for GPT-2 124M/774M, 2e-4 for 350M/1.5B)."""
    mvue: bool = False
    """Weight gradient from the unbiased 2:4 estimate MVUE24(∇Zᵀ)·X."""
    dense_finetune_fraction: float = Field(1 / 6, ge=0, lt=1)
    """The last fraction of training runs dense (F.linear on the full W); the final model is then dense."""


class SSTE(_TwoFour):
    """S-STE (NeurIPS'24): continuous soft-threshold projection with a frozen per-tensor scale."""

    method: Literal["sste"]
    mvue: bool = False
    """Weight gradient from MVUE24(∇Zᵀ)·X (S-STE pairs it with `precision.fp8`)."""


class AST(_SparseForward):
    """AST (AAAI'25): magnitude masks every 10 steps, annealed SR-STE decay inside the Adam moments."""

    method: Literal["ast"]
    targets: Targets = "all_linear"
    refresh_interval: int = Field(10, gt=0)
    decay: float = Field(6e-5, ge=0)
    """λ_max of λ(t) = λ_max·min(t/T₀, 1) (GPT-2 code default 6e-5, README 1e-4; LLaMA2-7B 6e-5)."""
    decay_warmup: float = Field(0.2, ge=0)
    """T₀: a share of train.steps when in (0, 1) (kept when the run's length changes), else whole steps
    (0: no warm-up). AST: GPT-2 10k of 40k iterations (0.25), LLaMA2-7B 3k of 15k (0.2)."""
    slorb: bool = False
    """Add the SLoRB low-rank branch y += (x·Xᵀ)·Sᵀ (dense, 12.5% extra parameters at k=16)."""
    slorb_k: int = Field(16, gt=0)
    """Block size k of SLoRB: rank in/k."""

    @model_validator(mode="after")
    def _whole_warmup_steps(self) -> AST:
        if self.decay_warmup >= 1 and not float(self.decay_warmup).is_integer():
            raise ValueError(f"sparsity.decay_warmup: {self.decay_warmup} is neither a share in (0, 1) nor whole steps")
        return self


class CAST(_Method):
    """CAST: AdamS with proportional L1 decay, learnable weight scaling, dense forward, final hard prune."""

    method: Literal["cast"]
    targets: Targets = "all_linear"
    refresh_interval: int = Field(10, gt=0)
    """T₁: masks recomputed every 10 steps, before that step's update."""
    decay: Annotated[float, Field(ge=0)] | Literal["auto"] = 4e-7
    """λ of AdamS (LLaMA2-7B: 4e-7); pulls pruned weights towards zero through μ̃. `auto`: measured
    from the model (docs/methods.md): λ = decay_auto_factor × the mean bias-corrected |μ| on pruned
    slots after the first decay_auto_steps updates, which run with λ = 0."""
    decay_auto_steps: int = Field(10, gt=0)
    """decay auto: the updates whose momentum sets λ (α_t ≤ decay_auto_steps/T while λ is 0)."""
    decay_auto_factor: float = Field(1.0, gt=0)
    """decay auto: λ in units of the pruned slots' mean |μ̂| (1: the decay outweighs a typical pruned
    slot's momentum from α_t = 1/2 on)."""
    scale_segments: int = Field(2, gt=0)
    """n of the learnable weight scaling A ∈ R^{out×n}: one scale per contiguous segment of in/n inputs."""


SparsityConfig = Annotated[
    Dense | STE | SRSTE | SparsePretrain | SSTE | AST | CAST, Field(discriminator="method")
]
"""The `sparsity` section; `method` selects the class."""

METHOD_CONFIGS: dict[str, type[_Method]] = {
    cls.model_fields["method"].annotation.__args__[0]: cls
    for cls in (Dense, STE, SRSTE, SparsePretrain, SSTE, AST, CAST)
}
