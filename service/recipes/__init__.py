"""The built-in recipes, one JSON file each beside this module (``service.core.recipes``).

They are reviewed data, versioned with the repository: a change to a recipe's rules bumps
its ``version``, which plans record. Read once per process.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources

from service.core.recipes import Recipe, parse_recipe


@cache
def builtin_recipes() -> tuple[Recipe, ...]:
    files = sorted(
        (f for f in resources.files(__package__).iterdir() if f.name.endswith(".json")),
        key=lambda f: f.name,
    )
    recipes = tuple(parse_recipe(json.loads(f.read_text(encoding="utf-8"))) for f in files)
    names = [r.name for r in recipes]
    if len(set(names)) != len(names):
        raise RuntimeError(f"two built-in recipes share a name: {sorted(names)}")
    return recipes
