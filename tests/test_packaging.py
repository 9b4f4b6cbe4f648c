"""Packaging: pyproject.toml declares ranges for the big libraries (so boothkit installs beside the versions a
ComfyUI/diffusers environment already has), constraints.txt pins the exact tested set, the installed versions
satisfy both, and README's "Tested versions" table says the same ranges."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
LIBRARIES = ("torch", "diffusers", "transformers", "peft", "accelerate")


def declared() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(line) for line in project["dependencies"]]
    requirements += [Requirement(line) for line in project["optional-dependencies"]["test"]]
    return {canonicalize_name(r.name): r for r in requirements}


def constraints() -> dict[str, Requirement]:
    lines = [line.split("#")[0].strip() for line in (REPO / "constraints.txt").read_text().splitlines()]
    return {canonicalize_name(r.name): r for r in map(Requirement, filter(None, lines))}


@pytest.mark.parametrize("name", LIBRARIES)
def test_big_libraries_are_ranges(name):
    specifiers = list(declared()[name].specifier)
    assert {s.operator for s in specifiers} == {">=", "<"}, f"{name}: want a range >=low,<high, got {specifiers}"


def test_constraints_pin_exact_versions_of_every_dependency():
    pins = constraints()
    for name, requirement in pins.items():
        assert [s.operator for s in requirement.specifier] == ["=="], f"{name} is not pinned with ==: {requirement}"
    missing = set(LIBRARIES) - set(pins)
    assert not missing, f"constraints.txt does not pin {sorted(missing)}"
    for name, requirement in pins.items():  # each pin lies within the declared range
        if name in declared():
            version = next(iter(requirement.specifier)).version
            assert declared()[name].specifier.contains(version, prereleases=True), f"{requirement} outside {declared()[name]}"


@pytest.mark.parametrize("source", ["pyproject.toml", "constraints.txt"])
def test_installed_versions_satisfy(source):
    requirements = declared() if source == "pyproject.toml" else constraints()
    for name, requirement in requirements.items():
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": "test"}):
            continue
        installed = metadata.version(name)
        assert requirement.specifier.contains(installed, prereleases=True), \
            f"installed {name} {installed} does not satisfy {source}: {requirement}"


def test_readme_table_matches_pyproject():
    readme = (REPO / "README.md").read_text()
    for name in LIBRARIES:
        row = re.search(rf"^\| {name} \| `([^`]+)` \| ([^ |]+)", readme, re.MULTILINE)
        assert row, f"README's Tested versions table has no row for {name}"
        assert Requirement(f"{name}{row.group(1)}").specifier == declared()[name].specifier, name
        assert row.group(2) == str(next(iter(constraints()[name].specifier)).version), name
