"""Recipes: every shipped one parses into its steps' configs; mistakes name the line."""

import dataclasses

import pytest

from shrink.compress.recipe import STEPS, parse_recipe, shipped_recipes
from shrink.errors import ShrinkError


def test_every_shipped_recipe_parses_into_its_step_configs():
    recipes = shipped_recipes()
    assert {"demo", "minitron-width", "qad-nvfp4"} <= set(recipes)
    for name, path in recipes.items():
        steps = parse_recipe(path)
        assert steps, name
        for step, config in steps:
            assert isinstance(config, STEPS[step])
            assert dataclasses.is_dataclass(config)


def test_demo_recipe_reads_as_written():
    steps = dict(parse_recipe(shipped_recipes()["demo"]))
    assert steps["prune"].params == 0.6 and steps["quantize"].format == "int4" and steps["quantize"].qad


@pytest.mark.parametrize("body, line, message", [
    ('[[step]]\nname = "prune"\nparams = 0.5\n\n[[step]]\nname = "shrinkify"\n', 6, "unknown step 'shrinkify'"),
    ('[[step]]\nname = "distill"\ntokens = 100\nlearning_rate = 1e-3\n', 4, "no key 'learning_rate'"),
    ('[[step]]\nname = "quantize"\nqad = "yes"\n', 3, "'qad' of step 'quantize' must be"),
    ('[[step]]\nname = "prune"\nparams = true\n', 3, "'params' of step 'prune' must be"),
    ('[model]\nname = "x"\n', 1, "unknown top-level key 'model'"),
])
def test_mistakes_name_the_line(tmp_path, body, line, message):
    path = tmp_path / "r.toml"
    path.write_text(body)
    with pytest.raises(ShrinkError, match=rf"r\.toml:{line}: .*{message}"):
        parse_recipe(path)


def test_broken_toml_and_missing_files_are_one_sentence(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[[step]\nname=")
    with pytest.raises(ShrinkError, match="not valid TOML"):
        parse_recipe(path)
    with pytest.raises(ShrinkError, match="No recipe"):
        parse_recipe(tmp_path / "missing.toml")
    with pytest.raises(ShrinkError, match="no \\[\\[step\\]\\] tables"):
        (tmp_path / "empty.toml").write_text('description = "x"\n')
        parse_recipe(tmp_path / "empty.toml")
