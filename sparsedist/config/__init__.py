"""Recipes: the typed schema and the YAML loader with inheritance and overrides."""

from sparsedist.config.load import RecipeError, load_recipe, recipe_hash
from sparsedist.config.schema import Recipe

__all__ = ["Recipe", "RecipeError", "load_recipe", "recipe_hash"]
