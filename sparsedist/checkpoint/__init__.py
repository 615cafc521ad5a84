"""Checkpoints: sharded torch DCP folders, written atomically, resumable at any world size."""

from sparsedist.checkpoint.dcp import Checkpointer
from sparsedist.checkpoint.manifest import CheckpointError, verify_manifest

__all__ = ["CheckpointError", "Checkpointer", "verify_manifest"]
