"""Running a model one transformer block at a time on cached calibration inputs."""

from __future__ import annotations

import torch
from torch import nn

from sparsedist.models.families import Family


class _StopForward(Exception):
    """Raised by the capture hook once block 0's inputs are recorded: nothing after it needs to run."""


class BlockInputs:
    """The arguments one block is called with, one call per calibration batch.

    The hidden states are the first positional argument (or the `hidden_states` keyword); the
    other arguments (attention masks, position embeddings, cache positions...) are computed
    once by the model before its first block and are the same for every block of the
    families sparsedist supports, so they are replayed unchanged.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[list, dict]] = []

    def record(self, args: tuple, kwargs: dict) -> None:
        self.calls.append((list(args), dict(kwargs)))

    def run(self, block: nn.Module) -> None:
        """Call the block on every batch, discarding its outputs (forward hooks see its layers' inputs)."""
        for args, kwargs in self.calls:
            block(*args, **kwargs)

    def advance(self, block: nn.Module) -> None:
        """Replace every batch's hidden states by the block's output: they become the next block's inputs.

        Batch by batch, so at most one batch of the old inputs outlives its replacement.
        """
        for args, kwargs in self.calls:
            output = block(*args, **kwargs)
            hidden = output[0] if isinstance(output, tuple) else output
            if args:
                args[0] = hidden
            else:
                kwargs["hidden_states"] = hidden


def capture_block_inputs(model: nn.Module, family: Family, calibration: list[torch.Tensor]) -> BlockInputs:
    """The inputs of the first block for every calibration batch of input_ids; runs only the embeddings."""
    inputs = BlockInputs()

    def record_and_stop(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        inputs.record(args, kwargs)
        raise _StopForward

    device = model.get_input_embeddings().weight.device
    handle = family.blocks(model)[0].register_forward_pre_hook(record_and_stop, with_kwargs=True)
    try:
        for input_ids in calibration:
            try:
                model(input_ids=input_ids.to(device), use_cache=False)
            except _StopForward:
                continue
            raise RuntimeError(f"the model's forward never reached {family.blocks_path}.0")
    finally:
        handle.remove()
    return inputs
