"""Reading recipes: YAML files with `base:` inheritance and dotted command-line overrides."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

from sparsedist.config.schema import Recipe
from sparsedist.config.sparsity import METHOD_CONFIGS
from sparsedist.errors import RecipeError


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `3e-4` as a string; recipes mean a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, merge and validate a recipe; raises RecipeError."""
    data = _read_with_bases(Path(path), seen=())
    for override in overrides:
        apply_override(data, override)
    return validate_recipe(data)


def _read_with_bases(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise RecipeError(f"base: inheritance cycle through {path}")
    try:
        data = parse_yaml(path.read_text())
    except FileNotFoundError:
        raise RecipeError(f"recipe not found: {path}") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise RecipeError(f"base: expected a path, got {base!r}")
    return deep_merge(_read_with_bases(path.parent / base, (*seen, path)), data)


def deep_merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """The child's keys win; mappings merge key by key, everything else is replaced."""
    merged = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply `a.b.c=value` (value parsed as YAML) in place; the key must exist in the schema."""
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise RecipeError(f"override {override!r}: expected KEY=VALUE, e.g. train.steps=50")
    parts = key.split(".")
    _check_schema_path(parts)
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"override {key}: {part} is not a section")
        node = child
    try:
        node[parts[-1]] = parse_yaml(raw)
    except yaml.YAMLError:
        raise RecipeError(f"override {key}: value {raw!r} is not valid YAML") from None


def _check_schema_path(parts: list[str]) -> None:
    """Refuse a dotted key that no schema section has (any method's, for the `sparsity` union)."""
    sections: list[type[BaseModel]] = [Recipe]
    for depth, part in enumerate(parts):
        if not sections:  # inside a free-form mapping such as model.config
            return
        fields = [s.model_fields[part] for s in sections if part in s.model_fields]
        here = dotted(parts[: depth + 1])
        if not fields:
            raise RecipeError(f"override {dotted(parts)}: unknown key {here}")
        sections = [t for f in fields for t in section_types(f.annotation)]
        if not sections and depth < len(parts) - 1 and not any(_is_mapping(f.annotation) for f in fields):
            raise RecipeError(f"override {dotted(parts)}: {here} has no sub-keys")


def section_types(annotation: Any) -> list[type[BaseModel]]:
    """The sections an annotation admits: a section class, or the classes of a union."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [t for arg in get_args(annotation) for t in section_types(arg)]


def _is_mapping(annotation: Any) -> bool:
    return getattr(annotation, "__origin__", None) is dict or any(_is_mapping(a) for a in get_args(annotation))


def validate_recipe(data: dict[str, Any]) -> Recipe:
    """Validate merged recipe data in strict JSON mode (so paths and lists read naturally)."""
    try:
        return Recipe.model_validate_json(json.dumps(data, default=str))
    except ValidationError as err:
        raise RecipeError("; ".join(_describe(e) for e in err.errors())) from None


def dotted(parts: list[Any]) -> str:
    """A key path for a one-line message: plain names as they are, any other part quoted (a key read from YAML may
    hold a newline or be empty)."""
    return ".".join(str(p) if str(p).isidentifier() or str(p).isdigit() else repr(str(p)) for p in parts)


UNION_MEMBER = re.compile(r"constrained-\w+|literal\[.*\]|float|int|str|bool")
"""pydantic's name for a member of a union in an error's location (`decay: float | 'auto'`), not a key."""


def _describe(error: dict[str, Any]) -> str:
    loc = [part for part in error["loc"] if not UNION_MEMBER.fullmatch(str(part))]
    if len(loc) > 1 and loc[0] == "sparsity" and loc[1] in METHOD_CONFIGS:
        loc.pop(1)  # the union's tag: the method is named in the message instead
        if error["type"] == "extra_forbidden":
            return f"{dotted(['sparsity', loc[-1]])}: not a key of method {error['loc'][1]!r}"
    key = dotted(loc)
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    if error["type"] == "missing":
        return f"{key}: missing"
    if error["type"] == "union_tag_invalid":
        return f"{key}.method: {error['input'].get('method')!r} is not one of {', '.join(METHOD_CONFIGS)}"
    if error["type"] == "value_error" or not key:
        return message  # cross-field rules name their keys themselves
    return f"{key}: {message} (got {error['input']!r})"


def recipe_hash(recipe: Recipe) -> str:
    """A short, stable fingerprint of the resolved recipe."""
    return hashlib.sha256(recipe.model_dump_json().encode()).hexdigest()[:12]


def flatten(recipe: Recipe) -> dict[str, str]:
    """The resolved recipe as dotted keys, for tracking params."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)

    walk("", recipe.model_dump(mode="json"))
    return out
