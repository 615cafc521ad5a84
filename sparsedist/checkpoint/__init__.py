"""Checkpoints: every on-disk format of a run's state (DCP folders, per-rank pieces, manifests), written
atomically, resumable at any world size."""

from sparsedist.checkpoint.checkpointer import TRAINER_FILE, Checkpointer, load_state
from sparsedist.checkpoint.manifest import CheckpointError, verify_manifest

__all__ = ["TRAINER_FILE", "CheckpointError", "Checkpointer", "load_state", "verify_manifest"]
