"""The reference docs hold together: every relative link in README.md and docs/ resolves (files and
#anchors), every metric the code exports is documented in docs/metrics.md, every config field the
code accepts is in docs/configuration.md, and nothing points outside the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from meterproxy.config import RawConfig
from meterproxy.metrics import Metrics, make_registry
from tests.procs import ROOT

DOCS = sorted([ROOT / "README.md", ROOT / "dashboards" / "README.md", *(ROOT / "docs").glob("*.md")])
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in _FENCE.sub("", path.read_text()).splitlines():
        m = re.match(r"^#{1,6}\s+(.*)$", line)
        if m:
            s = slug(m.group(1))
            n = seen.get(s, 0)
            seen[s] = n + 1
            out.add(s if n == 0 else f"{s}-{n}")
    return out


def links(path: Path) -> list[str]:
    return [t for t in _LINK.findall(_FENCE.sub("", path.read_text()))
            if not re.match(r"^[a-z]+:", t)]  # http:, https:, mailto:


def test_slug_matches_github() -> None:
    assert slug("`GET /admin/usage/records`") == "get-adminusagerecords"
    assert slug("`pricing` and `pricing_files`") == "pricing-and-pricing_files"
    assert slug("Stores, and what survives what") == "stores-and-what-survives-what"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path) -> None:
    broken = []
    for target in links(doc):
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.exists() or ROOT not in (dest, *dest.parents):
            broken.append(f"{target}: no such file in the repository")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert broken == []


def test_every_exported_metric_is_documented() -> None:
    registry = make_registry()
    Metrics(registry)
    exported = {m.name + ("_total" if m.type == "counter" else "") for m in registry.collect()}
    assert len(exported) >= 13
    text = (ROOT / "docs" / "metrics.md").read_text()
    documented = set(re.findall(r"^\| `(meterproxy_[a-z_]+)` \|", text, re.M))
    assert exported - documented == set()


def _fields(model: type[BaseModel], prefix: str) -> list[str]:
    out = []
    for name, info in model.model_fields.items():
        out.append(prefix + name)
        ann: Any = info.annotation
        for sub in (ann, *getattr(ann, "__args__", ())):
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                out += _fields(sub, prefix + name + ".")
    return out


def test_every_config_field_is_documented() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text()
    names = {w for span in re.findall(r"`([^`]+)`", text) for w in re.findall(r"\w+", span)}
    missing = [f for f in _fields(RawConfig, "") if f.rpartition(".")[2] not in names]
    assert missing == []


def test_nothing_points_outside_the_repository() -> None:
    files = subprocess.run(["git", "ls-files"], cwd=str(ROOT), capture_output=True, text=True,
                           check=True).stdout.split()
    outside = "../" + "shared"   # spelled in two parts so this file is not a hit itself
    hits = [f for f in files if (ROOT / f).is_file() and outside in (ROOT / f).read_text(errors="replace")]
    assert hits == []
    # What users read names the repository's own reference, not a contract they do not have.
    user_facing = ["README.md", "CHANGELOG.md", "Dockerfile", "meterproxy/cli.py", *(
        f for f in files if f.startswith(("docs/", "policies/", "deploy/", "dashboards/")))]
    assert [f for f in user_facing if "SPEC.md" in (ROOT / f).read_text(errors="replace")] == []
