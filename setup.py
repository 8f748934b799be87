"""Package discovery, the one thing pyproject.toml cannot say here (all other settings live there).

The repository root is the package `shrink` (package-dir {"shrink" = "."}); setuptools' find in
pyproject.toml reports what it finds without a prefix (`cli`, not `shrink.cli`), so the prefix is put
on here. Every directory with an __init__.py below the root is a subpackage; tests/ and benchmarks/
(no __init__.py, and excluded by name as well) are not installed.
"""

from setuptools import find_packages, setup

setup(packages=["shrink", *(f"shrink.{name}" for name in find_packages(exclude=["tests*", "benchmarks*"]))])
