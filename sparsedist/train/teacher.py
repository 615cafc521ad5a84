"""The distillation teacher and where it lives (`distill.teacher.placement`).

- `sharded`: a frozen copy wrapped like the student (FSDP2 shards it; DeepSpeed makes it an
  engine without an optimizer, partitioned under ZeRO-3). Costs its weights divided by the
  world size (under FSDP2 and ZeRO-3), no gradients, no optimizer state.
- `offload`: the whole frozen teacher in host memory on every rank; each top-level module
  (embeddings, every block, norm, head) is moved to the device for its forward and back
  after. Device memory: one block at a time; host memory: the full teacher per rank.
- `precomputed`: before the student exists, the teacher (placed as `sharded`) runs once over
  every micro-batch the run will train on and writes the top-k log-probabilities at the
  distillation temperature, per rank and step, to disk (staged, then published as a whole
  folder: `sparsedist.checkpoint.publish`); training reads them back. Device memory: none
  during training; disk: k × 8 bytes per token.

Every placement hands the loss the same thing for a micro-batch: the teacher's logits, or
its top-k log-probabilities (`TopK`), which `distill_kl` accepts alike.
"""

from __future__ import annotations

import gc
import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from sparsedist.checkpoint.publish import prepare, publish, staging_dir
from sparsedist.config import Recipe
from sparsedist.config.schema import ModelConfig
from sparsedist.data import TokenBatches
from sparsedist.errors import RecipeError
from sparsedist.models import FAMILIES, build_model
from sparsedist.parallel import ParallelBackend
from sparsedist.train.losses import TopK

_CACHE_FILE = re.compile(r"step_\d{8}\.rank\d+\.pt|complete\.json")


class Teacher:
    """The teacher's targets for micro-batch `index` of optimizer step `step` on this rank."""

    def targets(self, step: int, index: int, inputs: torch.Tensor) -> torch.Tensor | TopK:
        raise NotImplementedError


class LiveTeacher(Teacher):
    """A frozen model run next to the student (placements `sharded` and `offload`)."""

    def __init__(self, model: nn.Module, backend: ParallelBackend | None):
        self.model = model
        self.backend = backend
        """The backend that wrapped it (None when offloaded)."""

    @torch.no_grad()
    def targets(self, step: int, index: int, inputs: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=inputs, use_cache=False).logits
        if self.backend is not None:
            self.backend.after_eval(self.model)
        return logits


class PrecomputedTeacher(Teacher):
    """Top-k log-probabilities read back from `cache`, one file per step and rank."""

    def __init__(self, cache: Path, rank: int, device: torch.device):
        self.cache = cache
        self.rank = rank
        self.device = device
        self._step: int | None = None
        self._loaded: dict[str, torch.Tensor] = {}

    def targets(self, step: int, index: int, inputs: torch.Tensor) -> TopK:
        if self._step != step:
            self._loaded = torch.load(_step_file(self.cache, step, self.rank), map_location=self.device,
                                      weights_only=True)
            self._step = step
        return TopK(self._loaded["logprobs"][index], self._loaded["indices"][index])


def load_teacher_model(recipe: Recipe, config: PretrainedConfig) -> nn.Module:
    """The frozen teacher: the run's starting model (`self`) or another local checkpoint, with the
    vocabulary of the student (whose model config is `config`)."""
    cfg = recipe.distill.teacher
    path = recipe.model.pretrained if cfg.path == "self" else cfg.path
    model = build_model(ModelConfig(family=recipe.model.family, pretrained=path), config, recipe.train.seed)
    if model.config.vocab_size != config.vocab_size:
        raise RecipeError(f"distill.teacher.path: {path} has vocabulary {model.config.vocab_size}, "
                         f"the student {config.vocab_size}")
    return model.requires_grad_(False).eval()


def _sharded(recipe: Recipe, config: PretrainedConfig, backend: ParallelBackend) -> nn.Module:
    model = load_teacher_model(recipe, config)
    return backend.wrap(model, FAMILIES[recipe.model.family].blocks(model))


def offload_to_host(model: nn.Module, device: torch.device) -> nn.Module:
    """Keep `model` on the CPU; each top-level module with weights visits `device` for its forward."""
    def visit(module: nn.Module, args: tuple) -> None:
        module.to(device)

    def leave(module: nn.Module, args: tuple, output: object) -> None:
        module.to("cpu")

    model.to("cpu")
    for module in _top_level_modules(model):
        module.register_forward_pre_hook(visit)
        module.register_forward_hook(leave)
    return model


def _top_level_modules(model: nn.Module) -> list[nn.Module]:
    """The largest modules below the root that are leaves or transformer blocks (ModuleList items)."""
    found = []
    for child in model.children():
        if isinstance(child, nn.ModuleList):
            found.extend(child)
        elif any(isinstance(c, nn.ModuleList) for c in child.modules()):
            found.extend(_top_level_modules(child))
        elif any(True for _ in child.parameters()):
            found.append(child)
    return found


def build_teacher(recipe: Recipe, config: PretrainedConfig, backend: ParallelBackend) -> Teacher | None:
    """The teacher of a distillation run, placed as the recipe says (None without distillation).
    `precomputed` needs `precompute_teacher` to have run."""
    if recipe.distill.weight == 0:
        return None
    cfg, device = recipe.distill.teacher, backend.runtime.device
    if cfg.placement == "precomputed":
        if not _complete(cfg.cache_dir, recipe, backend):
            raise RecipeError(f"distill.teacher.cache_dir: no complete top-k cache for this run in {cfg.cache_dir}")
        return PrecomputedTeacher(cfg.cache_dir, backend.runtime.rank, device)
    if cfg.placement == "offload":
        return LiveTeacher(offload_to_host(load_teacher_model(recipe, config), device), None)
    return LiveTeacher(_sharded(recipe, config, backend), backend)


@torch.no_grad()
def precompute_teacher(recipe: Recipe, config: PretrainedConfig, backend: ParallelBackend,
                       data: TokenBatches) -> None:
    """Write the top-k teacher log-probabilities of every micro-batch of the run, once (skipped when
    the cache already holds a complete set for this layout). Call before the student takes memory."""
    cache = recipe.distill.teacher.cache_dir
    if _complete(cache, recipe, backend):
        return
    _check_replaceable(cache)
    staging = staging_dir(cache)  # the whole cache is published at the end, replacing the old one
    if backend.runtime.is_main:
        prepare(cache)
    torch.distributed.barrier()
    k, temperature = recipe.distill.teacher.top_k, recipe.distill.temperature
    model = _sharded(recipe, config, backend)
    rank, device = backend.runtime.rank, backend.runtime.device
    for step in range(recipe.train.steps):
        logprobs, indices = [], []
        for inputs, _ in data.micro_batches(step):
            logits = model(input_ids=inputs.to(device), use_cache=False).logits
            top = F.log_softmax(logits.float() / temperature, dim=-1).topk(min(k, logits.shape[-1]), dim=-1)
            logprobs.append(top.values.cpu())
            indices.append(top.indices.to(torch.int32).cpu())
        backend.after_eval(model)
        torch.save({"logprobs": torch.stack(logprobs), "indices": torch.stack(indices)},
                   _step_file(staging, step, rank))
    del model
    gc.collect()
    torch.distributed.barrier()
    if backend.runtime.is_main:
        (staging / "complete.json").write_text(json.dumps(_layout(recipe, backend)))
        publish(cache)
    torch.distributed.barrier()


def _layout(recipe: Recipe, backend: ParallelBackend) -> dict:
    t = recipe.train
    return {"steps": t.steps, "global_batch": t.global_batch, "micro_batch": t.micro_batch, "seed": t.seed,
            "seq_len": recipe.data.seq_len, "world_size": backend.runtime.world_size,
            "top_k": recipe.distill.teacher.top_k, "temperature": recipe.distill.temperature,
            "teacher": str(recipe.distill.teacher.path)}


def _complete(cache: Path, recipe: Recipe, backend: ParallelBackend) -> bool:
    marker = cache / "complete.json"
    return marker.is_file() and json.loads(marker.read_text()) == _layout(recipe, backend)


def _check_replaceable(cache: Path) -> None:
    """Refuse (on every rank) to replace a folder holding anything but a top-k cache's files."""
    foreign = [p.name for p in cache.iterdir() if not _CACHE_FILE.fullmatch(p.name)] if cache.is_dir() else []
    if foreign:
        raise RecipeError(f"distill.teacher.cache_dir: {cache} holds {foreign[0]}, which is not a top-k cache file; "
                           "refusing to replace it")


def _step_file(cache: Path, step: int, rank: int) -> Path:
    return cache / f"step_{step:08d}.rank{rank}.pt"
