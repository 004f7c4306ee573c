"""requirements/*.lock (issue #12): what `make`, and the Dockerfile, install. Each pins every package
with its hashes, from PyPI alone, and agrees with the ranges of pyproject.toml: a dependency added,
removed or re-ranged without `make lock` fails here, without a network."""

from __future__ import annotations

import re
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.procs import ROOT

REQS = ROOT / "requirements"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# Which extras each lock holds besides the runtime dependencies.
LOCKS = {"runtime": [], "demo": ["demo"], "dev": ["dev", "demo"]}
# The locks are compiled for CPython 3.11 on Linux (Makefile `lock`).
ENV = {"python_version": "3.11", "python_full_version": "3.11.7", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "os_name": "posix"}


def parse(name: str) -> tuple[dict[str, str], dict[str, list[str]], list[str]]:
    """(name → pinned version, name → hashes, other option lines) of one lock file."""
    text = (REQS / f"{name}.lock").read_text()
    pins: dict[str, str] = {}
    hashes: dict[str, list[str]] = {}
    options: list[str] = []
    for entry in re.sub(r"\s*\\\n\s*", " ", text).splitlines():
        entry = entry.split("#", 1)[0].strip()
        if not entry:
            continue
        if entry.startswith("-"):
            options.append(entry)
            continue
        m = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)(?: ?;[^-]*)?((?: --hash=sha256:[0-9a-f]{64})*)", entry)
        assert m, f"{name}.lock: not a pinned, hashed requirement: {entry!r}"
        key = canonicalize_name(m.group(1))
        pins[key] = m.group(2)
        hashes[key] = m.group(3).split()
    return pins, hashes, options


def direct(extras: list[str]) -> list[Requirement]:
    reqs = [Requirement(r) for r in PYPROJECT["dependencies"]]
    for extra in extras:
        reqs += [Requirement(r) for r in PYPROJECT["optional-dependencies"][extra]]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(ENV)]


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_every_package_is_pinned_and_hashed_from_pypi_alone(lock: str) -> None:
    pins, hashes, options = parse(lock)
    assert pins and all(hashes[n] for n in pins), [n for n in pins if not hashes[n]]
    # No local wheel folder or extra index: CI installs from PyPI alone.
    assert options == [], options
    text = (REQS / f"{lock}.lock").read_text()
    assert "file:" not in text and "/opt/" not in text and "-e " not in text
    assert "make lock" in text   # the command that regenerates it, in its header


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_lock_matches_the_ranges_of_pyproject(lock: str) -> None:
    pins, _, _ = parse(lock)
    wanted = direct(LOCKS[lock])
    for req in wanted:
        name = canonicalize_name(req.name)
        assert name in pins, f"{lock}.lock lacks {req}: run make lock"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{lock}.lock pins {name}=={pins[name]}, outside {req}: run make lock")
    # And nothing pyproject.toml no longer asks for: the direct dependencies pip-compile noted.
    text = (REQS / f"{lock}.lock").read_text()
    noted = {canonicalize_name(m) for m in re.findall(
        r"^([A-Za-z0-9._-]+)==[^\n]*(?:\n    [^\n]*)*?\n    #\s+(?:via\s+)?meterproxy \(pyproject\.toml\)",
        text, re.M)}
    assert noted == {canonicalize_name(r.name) for r in wanted}, "run make lock"


def test_the_locks_agree() -> None:
    """runtime ⊂ demo ⊂ dev, at the same versions: the demo and the dev venv run the runtime's pins."""
    runtime, demo, dev = (parse(n)[0] for n in ("runtime", "demo", "dev"))
    assert runtime.items() <= demo.items() <= dev.items(), (
        {n: (v, demo.get(n)) for n, v in runtime.items() if demo.get(n) != v},
        {n: (v, dev.get(n)) for n, v in demo.items() if dev.get(n) != v})
    assert {"openai", "pytest", "mypy"} <= dev.keys() and "openai" in demo and "pytest" not in demo
