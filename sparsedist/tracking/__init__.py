"""Experiment tracking: MLflow runs logged from rank 0."""

from sparsedist.tracking.mlflow_run import Tracker, tracking_uri

__all__ = ["Tracker", "tracking_uri"]
