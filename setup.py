"""Package discovery, the one thing pyproject.toml cannot say here (all other settings live there).

The repository root is the package `shrink` (package-dir {"shrink" = "."}); setuptools' find in
pyproject.toml reports what it finds without a prefix (`cli`, not `shrink.cli`), so the prefix is put
on here. Every directory with an __init__.py below the root is a subpackage; tests/ and benchmarks/
(no __init__.py, and excluded by name as well) are not installed, nor is this file (`shrink.setup`).
"""

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


class _BuildPy(build_py):
    def find_package_modules(self, package, package_dir):
        return [m for m in super().find_package_modules(package, package_dir) if m[:2] != ("shrink", "setup")]


setup(
    packages=["shrink", *(f"shrink.{name}" for name in find_packages(exclude=["tests*", "benchmarks*"]))],
    cmdclass={"build_py": _BuildPy},
)
