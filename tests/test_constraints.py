"""constraints.txt, the last set of versions known to pass: it must satisfy what setup.cfg declares, or
`pip install -c constraints.txt -e .` (the README's reproducible install) cannot resolve."""

from __future__ import annotations

import configparser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = Version(version)
    return pins


def _declared() -> list[Requirement]:
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    lines = [config["options"]["install_requires"], *config["options.extras_require"].values()]
    return [Requirement(line.strip()) for block in lines for line in block.splitlines() if line.strip()]


def test_every_declared_requirement_is_pinned_within_its_range():
    pins = _pins()
    for requirement in _declared():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"constraints.txt has no pin for {requirement.name}: run `make constraints`"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {requirement.name}=={pins[name]}, outside setup.cfg's {requirement.specifier}"
        )


def test_the_pins_are_exact_and_keep_the_cpu_torch_of_this_machine_class():
    pins = _pins()
    assert pins[canonicalize_name("torch")] == Version("2.13.0")  # SPEC §6: the pinned CPU wheel
    assert all(not version.local for version in pins.values())  # `+cpu` would not resolve from the registry
