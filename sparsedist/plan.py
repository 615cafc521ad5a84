"""`sparsedist plan`: what a recipe costs on a cluster, before any process starts.

The model is built on the meta device and converted by the recipe's method, so parameter
counts (and the method's own parameters: CAST's scales, SLoRB) are exact. Memory per GPU is
an estimate from those counts and the recipe's layout:

- weights, gradients and optimizer state follow the backend: FSDP2 shards fp32 weights,
  fp32 gradients and Adam's two fp32 moments over all ranks and gathers two blocks (the
  current one and the prefetched one) plus the root (embeddings, head) in the compute dtype;
  DeepSpeed keeps compute-dtype weights on every rank below stage 3, fp32 master weights and
  moments partitioned from stage 1, gradients partitioned from stage 2, and can offload
  master weights and moments to the host;
- masks: one bit per sparse weight, sharded with the weight (FSDP2, ZeRO-3);
- forms of W̃ the products keep (sparsity/product.py): with `sparsity.kernel: semi_structured`
  the cuSPARSELt-compressed W̃ (and W̃ᵀ for transposable masks), 9/16 of the dense bf16 bytes
  each (`_cslt_compress` allocates numel·9/16 16-bit elements), and with `precision.fp8` the
  e4m3 W̃ (1 byte per weight); kept for a whole step where the weights are whole on a rank (one
  process, ZeRO-1/2), only for the one layer in use where they are gathered (FSDP2, ZeRO-3);
- the teacher by placement: `sharded` like the student's weights, `offload` one block at a
  time, `precomputed` nothing on the GPU (its top-k files on disk);
- activations per micro-batch, with fused attention (no seq² term): a block keeps about
  (8·d + k·ffn) values per token in the compute dtype (k = 3 gated, 2 otherwise); with
  activation checkpointing only each block's input plus one block being recomputed; the
  logits cost (compute dtype + two fp32 copies) per token and vocabulary entry;
- 10% of the GPU is left to the allocator and the CUDA context.

FLOPs per token are 6·N + 12·L·d·seq (weights and attention, forward and backward), plus a
second forward under activation checkpointing and the teacher's forward when distilling
live. Time = model FLOPs / (GPUs × peak × MFU), or tokens / a measured throughput.
"""

from __future__ import annotations

from dataclasses import dataclass

from sparsedist.config.schema import Recipe
from sparsedist.errors import RecipeError
from sparsedist.models import FAMILIES, count_parameters
from sparsedist.preflight import meta_model

GIB = 2**30
COMPRESSED_BYTES = 2 * 9 / 16
"""Bytes per weight of a cuSPARSELt-compressed bf16/fp16 tensor (values and metadata)."""
HEADROOM = 0.9
NOMINAL_TOLERANCE = 0.10


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    gpu_memory: float
    """Bytes per GPU."""
    peak_flops: float = 989e12
    """Dense bf16 FLOP/s per GPU (H100 SXM)."""
    mfu: float = 0.4
    tokens_per_second: float | None = None
    """A measured throughput of the whole cluster, used instead of peak × MFU."""

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class ModelSizes:
    """What the estimate needs from the model: parameter counts and shapes."""

    params: int
    dense_params: int
    sparse_weights: int
    largest_block: int
    root: int
    layers: int
    hidden: int
    ffn: int
    gated: bool
    vocab: int
    forms: int = 0
    """Bytes of the forms of W̃ every kernel and FP8 layer keeps for a step (module docstring)."""
    largest_forms: int = 0
    """The same for the largest such layer."""


def model_sizes(recipe: Recipe) -> ModelSizes:
    model, method = meta_model(recipe)
    family = FAMILIES[recipe.model.family]
    blocks = family.blocks(model)
    extras = sum(p.numel() for layer in method.layers.values() for name, p in layer.named_parameters()
                 if p.requires_grad and name not in ("weight", "bias"))
    params = count_parameters(model)
    block_params = [count_parameters(block) for block in blocks]
    first_ffn = blocks[0].get_submodule(family.ffn_linears[0])
    forms = [layer.weight.numel() * (COMPRESSED_BYTES * (1 + layer.product.transposable)
                                     * layer.product.semi_structured + layer.product.fp8)
             for layer in method.layers.values()]
    return ModelSizes(
        params=params, dense_params=params - extras,
        sparse_weights=sum(layer.weight.numel() for layer in method.layers.values()),
        largest_block=max(block_params), root=params - sum(block_params), layers=len(blocks),
        hidden=first_ffn.in_features, ffn=first_ffn.out_features, gated=len(family.ffn_linears) == 3,
        vocab=model.get_output_embeddings().weight.shape[0], forms=int(sum(forms)),
        largest_forms=int(max(forms, default=0)),
    )


def memory(sizes: ModelSizes, recipe: Recipe, world: int) -> dict[str, float]:
    """Estimated bytes per GPU by item (the module docstring gives the model)."""
    p, n = recipe.parallel, sizes.params
    c = 2 if p.mixed_precision == "bf16" else 4
    ds = p.backend == "deepspeed"
    sharded_weights = p.backend == "fsdp2" or (ds and p.zero_stage == 3)
    gathered = c * (2 * sizes.largest_block + sizes.root)
    if p.backend == "fsdp2" and not p.reshard_after_forward:
        gathered = c * n
    if not ds:
        weights = 4 * n / world + (gathered if p.backend == "fsdp2" else 0)
        grads, states = 4 * n / world, 8 * n / world
    else:
        master = 0 if p.offload_optimizer else 4 * n / world
        compute = (c * n / world + gathered) if p.zero_stage == 3 else c * n
        weights = compute + (master if c == 2 else 0)
        grads = c * n / (world if p.zero_stage >= 2 else 1)
        states = 0 if p.offload_optimizer else 8 * n / world
    out = {"weights": weights, "gradients": grads, "optimizer state": states,
           "masks": sizes.sparse_weights / 8 / (world if sharded_weights else 1)}
    if sizes.forms:
        out["kept forms of W̃"] = sizes.largest_forms if sharded_weights else sizes.forms
    if recipe.distill.weight > 0:
        placement = recipe.distill.teacher.placement
        teacher = sizes.dense_params
        out["teacher"] = {"sharded": c * teacher / world + gathered if sharded_weights else c * teacher,
                          "offload": c * (sizes.largest_block + sizes.root), "precomputed": 0}[placement]
    tokens = recipe.train.micro_batch * recipe.data.seq_len
    block = c * tokens * (8 * sizes.hidden + (3 if sizes.gated else 2) * sizes.ffn)
    kept = c * tokens * sizes.hidden * sizes.layers + block if p.activation_checkpointing else block * sizes.layers
    live_teacher = recipe.distill.weight > 0 and recipe.distill.teacher.placement != "precomputed"
    out["activations"] = kept + tokens * sizes.vocab * (c + 8 + (c if live_teacher else 0))
    return out


@dataclass
class Plan:
    sizes: ModelSizes
    world: int
    memory: dict[str, float]
    usable: float
    tokens_per_step: int
    steps: int
    flops: float
    seconds: float
    suggestions: list[str]
    disk: float

    @property
    def total(self) -> float:
        return sum(self.memory.values())

    @property
    def fits(self) -> bool:
        return self.total <= self.usable


def training_flops(params: int, layers: int, hidden: int, seq_len: int, tokens: int) -> float:
    """Model FLOPs of training on `tokens`: 6·N per token for the weights, 12·L·d·seq for attention."""
    return (6 * params + 12 * layers * hidden * seq_len) * tokens


def make_plan(recipe: Recipe, cluster: Cluster) -> Plan:
    """The plan of `recipe` on `cluster`; RecipeError when the model misses its nominal size."""
    if recipe.parallel.backend == "none" and cluster.world > 1:
        raise RecipeError("parallel.backend: 'none' runs one process; plan several GPUs with fsdp2 or deepspeed")
    micro = cluster.world * recipe.train.micro_batch
    if recipe.train.global_batch % micro:
        raise RecipeError(f"train.global_batch: {recipe.train.global_batch} is not divisible by {cluster.world} GPUs "
                          f"× train.micro_batch {recipe.train.micro_batch}")
    sizes = model_sizes(recipe)
    nominal = recipe.model.nominal_params
    if nominal and abs(sizes.dense_params - nominal) > NOMINAL_TOLERANCE * nominal:
        raise RecipeError(f"model.nominal_params: the model has {sizes.dense_params / 1e6:,.1f}M parameters, "
                          f"not {nominal / 1e6:,.1f}M (more than {NOMINAL_TOLERANCE:.0%} off)")
    mem = memory(sizes, recipe, cluster.world)
    tokens_per_step = recipe.train.global_batch * recipe.data.seq_len
    tokens = tokens_per_step * recipe.train.steps
    flops = training_flops(sizes.params, sizes.layers, sizes.hidden, recipe.data.seq_len, tokens)
    seconds = (tokens / cluster.tokens_per_second if cluster.tokens_per_second
               else flops / (cluster.world * cluster.peak_flops * cluster.mfu))
    usable = HEADROOM * cluster.gpu_memory
    topk = recipe.distill.weight > 0 and recipe.distill.teacher.placement == "precomputed"
    disk = tokens * recipe.distill.teacher.top_k * 8 if topk else 0
    plan = Plan(sizes, cluster.world, mem, usable, tokens_per_step, recipe.train.steps, flops, seconds, [], disk)
    if not plan.fits:
        plan.suggestions = suggestions(sizes, recipe, cluster, usable)
    return plan


def suggestions(sizes: ModelSizes, recipe: Recipe, cluster: Cluster, usable: float) -> list[str]:
    """Changes that would make the plan fit, each with the memory per GPU it gives."""
    p = recipe.parallel
    changes = []
    if not p.activation_checkpointing:
        changes.append(("parallel.activation_checkpointing=true", {"parallel": {"activation_checkpointing": True}}))
    if p.backend == "deepspeed" and p.zero_stage < 3:
        changes.append(("parallel.zero_stage=3", {"parallel": {"zero_stage": 3}}))
    if p.backend == "deepspeed" and not p.offload_optimizer:
        changes.append(("parallel.offload_optimizer=true", {"parallel": {"offload_optimizer": True}}))
    if recipe.distill.weight > 0 and recipe.distill.teacher.placement != "precomputed":
        changes.append(("distill.teacher.placement=precomputed",
                        {"distill": {"teacher": {"placement": "precomputed"}}}))
    if recipe.train.micro_batch > 1:
        changes.append(("train.micro_batch=1", {"train": {"micro_batch": 1}}))
    out = []
    for text, update in changes:
        total = sum(memory(sizes, _updated(recipe, update), cluster.world).values())
        out.append(f"{text} → {total / GIB:,.1f} GiB per GPU" + (" (fits)" if total <= usable else ""))
    for nodes in range(cluster.nodes + 1, 4 * cluster.nodes + 65):
        if sum(memory(sizes, recipe, nodes * cluster.gpus_per_node).values()) <= usable:
            out.append(f"--nodes {nodes} ({nodes * cluster.gpus_per_node} GPUs) with the recipe as it is (fits)")
            break
    return out


def _updated(recipe: Recipe, update: dict) -> Recipe:
    data = recipe.model_dump()
    for section, keys in update.items():
        target = data[section]
        for key, value in keys.items():
            if isinstance(value, dict):
                target[key].update(value)
            else:
                target[key] = value
    return Recipe.model_validate(data)


def format_plan(plan: Plan, cluster: Cluster) -> str:
    s = plan.sizes
    lines = [
        f"model: {s.params / 1e6:,.1f}M trainable parameters ({s.dense_params / 1e6:,.1f}M dense, "
        f"{s.sparse_weights / 1e6:,.1f}M sparse weights), {s.layers} blocks, d={s.hidden}, ffn={s.ffn}, "
        f"vocab {s.vocab}",
        f"cluster: {cluster.nodes} × {cluster.gpus_per_node} GPUs of {cluster.gpu_memory / GIB:,.0f} GiB "
        f"({plan.usable / GIB:,.1f} GiB usable each)",
        "memory per GPU (estimate):",
        *(f"  {item:<17} {value / GIB:>9,.2f} GiB" for item, value in plan.memory.items()),
        f"  {'total':<17} {plan.total / GIB:>9,.2f} GiB",
        f"tokens: {plan.tokens_per_step:,} per step × {plan.steps:,} steps = {plan.tokens_per_step * plan.steps:,}",
        f"compute: {plan.flops:.3e} FLOPs; time: {plan.seconds / 3600:,.1f} h "
        + (f"at {cluster.tokens_per_second:,.0f} tokens/s" if cluster.tokens_per_second else
           f"at {cluster.mfu:.0%} MFU of {cluster.peak_flops / 1e12:,.0f} TFLOP/s per GPU"),
    ]
    if plan.disk:
        lines.append(f"teacher top-k files: {plan.disk / GIB:,.1f} GiB on disk")
    if not plan.fits:
        lines.append(f"does not fit: {plan.total / GIB:,.1f} GiB > {plan.usable / GIB:,.1f} GiB usable; "
                     "would fit or help:")
        lines += [f"  {line}" for line in plan.suggestions]
    return "\n".join(lines)
