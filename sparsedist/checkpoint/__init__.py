"""Checkpoints: sharded torch DCP folders, written atomically, resumable at any world size."""

from sparsedist.checkpoint.dcp import Checkpointer

__all__ = ["Checkpointer"]
