"""Recipes: every shipped one parses into its steps' configs; mistakes name the line."""

import dataclasses
from pathlib import Path

import pytest

from shrink.flows.recipe import STEPS, parse_recipe, recipe_toml, shipped_recipes
from shrink.errors import ShrinkError


def test_every_shipped_recipe_parses_into_its_step_configs():
    recipes = shipped_recipes()
    assert {"demo", "prune-qad-q4", "minitron-width", "qad-nvfp4"} <= set(recipes)
    for name, path in recipes.items():
        steps = parse_recipe(path)
        assert steps, name
        for step, config in steps:
            assert isinstance(config, STEPS[step])
            assert dataclasses.is_dataclass(config)


WRITTEN = """description = "values chosen here, none of them a default"

[[step]]
name = "prune"
params = 0.25
axis = "both"

[[step]]
name = "quantize"
format = "nvfp4"
qad = true
tokens = 4096

[[step]]
name = "verify"
max_kl = 0.5
"""


def test_a_recipe_reads_as_written_and_what_it_leaves_out_is_the_default(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(WRITTEN)
    steps = parse_recipe(path)
    assert [name for name, _ in steps] == ["prune", "quantize", "verify"]  # the file's order
    prune, quantize, verify = (config for _, config in steps)
    assert (prune.params, prune.axis) == (0.25, "both")
    assert (quantize.format, quantize.qad, quantize.tokens) == ("nvfp4", True, 4096)
    assert verify.max_kl == 0.5
    # every key the file does not name is the step's default
    assert prune == dataclasses.replace(STEPS["prune"](), params=0.25, axis="both")
    assert quantize == dataclasses.replace(STEPS["quantize"](), format="nvfp4", qad=True, tokens=4096)
    assert verify == dataclasses.replace(STEPS["verify"](), max_kl=0.5)


@pytest.mark.parametrize("name", sorted(shipped_recipes()))
def test_a_recipe_written_back_reads_the_same(tmp_path, name):
    steps = parse_recipe(shipped_recipes()[name])
    path = tmp_path / "again.toml"
    path.write_text(recipe_toml(steps, "written back"))
    assert parse_recipe(path) == steps


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


def test_a_step_name_that_is_not_a_string_is_named(tmp_path):
    # found by benchmarks/fuzz_readers.py: a table as the step name raised TypeError (unhashable dict)
    import pytest

    from shrink.errors import ShrinkError
    from shrink.flows.recipe import parse_recipe

    path = tmp_path / "recipe.toml"
    path.write_text('[[step]]\nname = {a = 1}\n')
    with pytest.raises(ShrinkError, match="unknown step"):
        parse_recipe(path)
    path.write_text('step = 3\n')
    with pytest.raises(ShrinkError, match="must be \\[\\[step\\]\\] tables"):
        parse_recipe(path)


def test_a_shipped_recipe_is_found_beside_a_directory_of_its_name(tmp_path, monkeypatch):
    from shrink.flows.run import recipe_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()  # a run directory called demo (`-o demo`) must not hide the recipe
    assert recipe_path(Path("demo")).name == "demo.toml" and recipe_path(Path("demo")).is_file()
