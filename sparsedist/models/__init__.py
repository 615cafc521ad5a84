"""Models: transformers Llama, OPT and GPT-2, built from a recipe, with each family's layout."""

from sparsedist.models.build import build_model, count_parameters, export_pretrained, model_config
from sparsedist.models.families import FAMILIES, Family

__all__ = [
    "FAMILIES",
    "Family",
    "build_model",
    "count_parameters",
    "export_pretrained",
    "model_config",
]
