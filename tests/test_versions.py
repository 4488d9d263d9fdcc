"""The installed dependencies are ones this project declares, and its lower bounds are the versions .ci/oldest tests
(issue 27): a release outside the ranges fails here first, with what to do, not somewhere deep in another test."""

from __future__ import annotations

import ast
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _declared() -> dict[str, Requirement]:
    """setup.py's install_requires, read from its source."""
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    call = next(
        node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup"
    )
    requires = ast.literal_eval(next(keyword.value for keyword in call.keywords if keyword.arg == "install_requires"))
    return {Requirement(text).name.lower(): Requirement(text) for text in requires}


def _oldest_pins() -> dict[str, Version]:
    lines = (ROOT / ".ci" / "oldest-versions.txt").read_text(encoding="utf-8").splitlines()
    pins = [line.split("==") for line in lines if line.strip() and not line.startswith("#")]
    return {name.strip().lower(): Version(pin.strip()) for name, pin in pins}


@pytest.mark.parametrize("name", sorted(_declared()))
def test_27_3_each_installed_dependency_is_in_the_declared_range(name):
    requirement = _declared()[name]
    try:
        installed = version(name)
    except PackageNotFoundError:
        pytest.fail(f"{name} is not installed; install the package (pip install -e .) before running the tests.")
    assert requirement.specifier.contains(Version(installed).base_version, prereleases=True), (
        f"{name} {installed} is installed, outside the range setup.py declares ({requirement.specifier}); the README's "
        "'Tested versions' lists the releases the tests have seen. Install one of those, or run the tests with this "
        "release and widen the range in setup.py."
    )


def test_27_2_the_oldest_job_installs_the_declared_lower_bounds():
    pins, declared = _oldest_pins(), _declared()
    assert set(pins) == set(declared)
    for name, requirement in declared.items():
        lower = [Version(spec.version) for spec in requirement.specifier if spec.operator == ">="]
        assert len(lower) == 1, f"setup.py gives {name} no single lower bound"
        if name != "torch":  # the CPU job's torch is the oldest CPU wheel at hand (.ci/oldest-versions.txt)
            assert pins[name] == lower[0], f"{name}: setup.py says >={lower[0]}, .ci/oldest tests {pins[name]}"


@pytest.mark.skipif(not os.environ.get("OLDEST"), reason="only in .ci/oldest")
def test_27_2_the_oldest_job_runs_on_the_oldest_versions():
    for name, pin in _oldest_pins().items():
        assert Version(Version(version(name)).base_version) == pin, f"{name} {version(name)} installed, not {pin}"
