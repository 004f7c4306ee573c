"""Ledger database URLs: `sqlite://PATH` (sqlite:///var/lib/x.db is the absolute path
/var/lib/x.db; a relative PATH is relative to `base_dir`, the config file's folder) and
`postgresql://` / `postgres://` (any libpq-style URL asyncpg accepts)."""

from __future__ import annotations

import re
from pathlib import Path

SCHEMES = ("sqlite://", "postgresql://", "postgres://")


def sqlite_path(url: str, base_dir: str | Path = ".") -> Path:
    """The file of a sqlite:// URL."""
    p = Path(url.removeprefix("sqlite://"))
    return p if p.is_absolute() else Path(base_dir) / p


def redact(url: str) -> str:
    """A store or ledger URL without its password (user:password@ and ?password=), for logs,
    check-config and errors: the one redaction every place that prints a URL uses."""
    url = re.sub(r"//([^:/@]*):[^@/]*@", r"//\1:***@", url)
    return re.sub(r"(?i)([?&]password=)[^&]*", r"\1***", url)

