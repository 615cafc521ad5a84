"""Experiment tracking: MLflow runs logged from rank 0."""

from sparsedist.tracking.mlflow_run import Tracker, experiment_id, tracking_uri

__all__ = ["Tracker", "experiment_id", "tracking_uri"]
