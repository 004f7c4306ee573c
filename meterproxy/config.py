"""Config: YAML with ${ENV} substitution → validated, frozen Config (docs/configuration.md).

Every error is reported as `path.to.field: message`, all at once, so an operator fixes a file in
one pass. Derived lookup tables (key hash → Principal, path prefix → provider) are built here,
once per load, so the request path does dict lookups only.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from meterproxy.limits import Limits
from meterproxy.pricing import Price, PriceTable
from meterproxy.pricing_file import FileReport, load_pricing_file
from meterproxy.store.sql import redact
from meterproxy.transport.origin import Origin, TLSFiles

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class ConfigError(Exception):
    """An invalid config; `errors` holds every problem as `path.to.field: message`."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Model):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_body_bytes: int = Field(10 * 1024 * 1024, gt=0)
    upstream_timeout_s: float = Field(600.0, gt=0)
    # An answer with no byte for this long is cut (504 upstream_timeout if nothing was sent yet).
    stream_idle_timeout_s: float = Field(300.0, gt=0)
    connect_timeout_s: float = Field(10.0, gt=0)
    # Reservation for requests that name no max_tokens: admission must reserve something.
    default_max_tokens: int = Field(4096, ge=0)
    shutdown_grace_s: float = Field(30.0, ge=0)
    # Where /metrics is served: "main" (same listener), or a separate port on `metrics_host`.
    metrics_port: int | None = Field(None, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    # Require the admin key for /metrics on the main listener.
    metrics_require_admin: bool = False
    # Distinct model label values per process before further ones become "other".
    max_model_labels: int = Field(200, ge=1)
    # Log lines on stderr: text, or one JSON object per line for log shippers (docs/operations.md).
    log_format: Literal["text", "json"] = "text"
    # Client connections (issue #14; read at start, a reload does not change them). None of them
    # applies while a response is being sent: a slow stream download is never cut by them.
    max_header_bytes: int = Field(65536, ge=1024)     # request line + header fields; more → 431
    max_headers: int = Field(100, ge=1)               # header fields; more → 431
    header_timeout_s: float = Field(20.0, gt=0)       # connection (or next request) → complete head; 408
    body_read_timeout_s: float = Field(30.0, gt=0)    # longest pause inside a request body; 408
    keep_alive_timeout_s: float = Field(75.0, gt=0)   # an idle kept-alive connection is closed
    max_connections: int = Field(2048, ge=1)          # open client connections; beyond → 503
    # A model without a price: metered at cost 0 and counted (allow), or refused with 403 (refuse).
    unpriced: Literal["allow", "refuse"] = "allow"


class StoreConfig(_Model):
    url: str | None = None
    on_error: Literal["open", "closed"] = "open"
    timeout_ms: int = Field(250, gt=0)
    lease_ttl_s: float = Field(900.0, gt=0)
    max_backlog: int = Field(1_000_000, gt=0)

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("redis://", "rediss://", "redis+cluster://", "unix://")):
            raise ValueError("must start with redis://, rediss://, redis+cluster:// or unix://")
        if v is not None and not v.startswith("redis+cluster://"):
            from meterproxy.store.wire import WireRedis  # parses only: no connection is opened

            try:
                WireRedis(v)
            except OSError as exc:  # ssl_ca_certs / ssl_certfile that cannot be read
                raise ValueError(f"cannot read a TLS file named in the URL: {exc}") from exc
            except ValueError as exc:  # an unknown option, a db that is not a number, ...
                raise ValueError(str(exc)) from exc
        return v


class ExportConfig(_Model):
    type: Literal["cloudevents"]
    url: str
    headers: dict[str, str] = {}
    name: str | None = None            # cursor and metric label; default: the type
    batch_size: int = Field(100, ge=1, le=10_000)

    @field_validator("url")
    @classmethod
    def _http(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v


class LedgerConfig(_Model):
    url: str | None = None             # omit: sqlite file meterproxy-ledger.db beside the config
    retention_days: int = Field(400, ge=1)
    migrate: Literal["auto", "manual"] = "auto"
    export: list[ExportConfig] = []

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str | None) -> str | None:
        from meterproxy.store.sql import SCHEMES

        if v is not None and not v.startswith(SCHEMES):
            raise ValueError(f"must start with {', '.join(SCHEMES)}")
        return v

    @field_validator("export")
    @classmethod
    def _names(cls, v: list[ExportConfig]) -> list[ExportConfig]:
        names = [e.name or e.type for e in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"exporter names must be unique (set `name`): {', '.join(dup)}")
        return v


class AdminConfig(_Model):
    key_sha256: str | None = None

    @field_validator("key_sha256")
    @classmethod
    def _hex(cls, v: str | None) -> str | None:
        if v is not None and not _HEX64.match(v):
            raise ValueError("must be 64 lowercase hex characters (sha256 of the admin key)")
        return v


class AuthHeader(_Model):
    header: str = Field(min_length=1)
    value: str = Field(min_length=1)


class AsyncRuns(_Model):
    poll_path: str
    ttl_s: float = Field(86400.0, gt=0)

    @field_validator("poll_path")
    @classmethod
    def _uid(cls, v: str) -> str:
        if "{uid}" not in v or not v.startswith("/"):
            raise ValueError("must start with / and contain {uid}")
        return v


class ClientCert(_Model):
    cert: str = Field(min_length=1)
    key: str | None = None  # omitted: the key is in the cert file


class ProviderConfig(_Model):
    base_url: str
    paths: list[str] = Field(min_length=1)
    auth: AuthHeader | None = None
    stream_by_default: bool = False
    async_runs: AsyncRuns | None = None
    # inject: add include_usage to streams that lack it and strip the usage chunk it causes;
    # always: the provider streams usage unasked, so neither is done.
    stream_usage: Literal["inject", "always"] = "inject"
    ca_file: str | None = None
    client_cert: ClientCert | None = None

    @model_validator(mode="after")
    def _tls(self) -> ProviderConfig:
        if self.ca_file is None and self.client_cert is None:
            return self
        if not self.base_url.startswith("https://"):
            raise ValueError("ca_file and client_cert need an https:// base_url")
        cc = self.client_cert
        files = TLSFiles(self.ca_file, cc.cert if cc else None, cc.key if cc else None)
        for name, path in (("ca_file", files.ca_file), ("client_cert.cert", files.cert),
                           ("client_cert.key", files.key)):
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"{name}: no such file {path}")
        try:  # read the files now: a bad file or a key that does not match is a config error
            files.context()
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise ValueError(f"ca_file / client_cert: {exc}") from exc
        return self

    def tls_files(self) -> TLSFiles:
        """The TLS files with their modification times now (checked to exist by _tls)."""
        cc = self.client_cert
        if self.ca_file is None and cc is None:
            return TLSFiles()
        return TLSFiles(self.ca_file, cc.cert if cc else None, cc.key if cc else None).stamped()

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        Origin.parse(v)  # ValueError: no host, a query, a bad port
        return v.rstrip("/")

    @field_validator("paths")
    @classmethod
    def _paths(cls, v: list[str]) -> list[str]:
        for p in v:
            if not p.startswith("/"):
                raise ValueError(f"path prefix {p!r} must start with /")
        return v


class TierConfig(_Model):
    """A long-context tier; a field left out keeps the model's base price."""

    input: Decimal | None = Field(None, ge=0)
    output: Decimal | None = Field(None, ge=0)
    cached_input: Decimal | None = Field(None, ge=0)
    cache_write: Decimal | None = Field(None, ge=0)


class PriceConfig(_Model):
    input: Decimal = Field(ge=0)
    output: Decimal = Field(ge=0)
    cached_input: Decimal | None = Field(None, ge=0)
    cache_write: Decimal | None = Field(None, ge=0)    # tokens written to a prompt cache; default input
    above_prompt_tokens: dict[int, TierConfig] = {}   # prompt > threshold: the tier prices it all

    def price(self) -> Price:
        base = Price.of(self.input, self.output, self.cached_input, self.cache_write)
        return Price.of(self.input, self.output, self.cached_input, self.cache_write, tiers={
            t: Price.of(base.input if tc.input is None else tc.input,
                        base.output if tc.output is None else tc.output,
                        _or(tc.cached_input, base.cached_input), _or(tc.cache_write, base.cache_write))
            for t, tc in self.above_prompt_tokens.items()})


def _or(v: Decimal | None, default: Decimal | None) -> Decimal | None:
    return default if v is None else v


class LimitsConfig(_Model):
    rpm: int | None = Field(None, ge=0)
    tpm: int | None = Field(None, ge=0)
    concurrency: int | None = Field(None, ge=0)
    daily_tokens: int | None = Field(None, ge=0)
    monthly_tokens: int | None = Field(None, ge=0)
    daily_usd: Decimal | None = Field(None, ge=0)
    monthly_usd: Decimal | None = Field(None, ge=0)

    @field_validator("rpm", "tpm")
    @classmethod
    def _bucket(cls, v: int | None) -> int | None:
        # A bucket of capacity 0 refills at 0/s: the memory limiter divided by it (500 on every
        # request) and the Redis script errored, which fails open (issue #7). To refuse every
        # request there are limits that mean it: concurrency 0 or a budget of 0.
        if v == 0:
            raise ValueError("must be at least 1 (to refuse every request use concurrency: 0 or a budget of 0)")
        return v


class UserConfig(_Model):
    plan: str | None = None
    limits: LimitsConfig | None = None


class KeyConfig(_Model):
    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.:@-]+$")
    user: str = Field(min_length=1)
    sha256: str
    plan: str | None = None
    limits: LimitsConfig | None = None
    models: list[str] | None = None

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v: str) -> str:
        if not _HEX64.match(v):
            raise ValueError("must be 64 lowercase hex characters (see `meterproxy new-key`)")
        return v


class RawConfig(_Model):
    server: ServerConfig = Field(default_factory=ServerConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    ledger: LedgerConfig = Field(default_factory=LedgerConfig)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    providers: dict[str, ProviderConfig] = Field(min_length=1)
    pricing: dict[str, PriceConfig] = {}
    pricing_files: list[str] = []   # LiteLLM model_prices_and_context_window.json format; YAML wins
    plans: dict[str, LimitsConfig] = {}
    users: dict[str, UserConfig] = {}
    keys: list[KeyConfig] = []


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a key is: resolved once at config load so auth is one dict lookup."""

    key_id: str
    user: str
    limits: Limits
    user_limits: Limits
    models: tuple[str, ...] | None

    def allows_model(self, model: str) -> bool:
        if self.models is None:
            return True
        return any(fnmatch.fnmatchcase(model, pat) for pat in self.models)


@dataclass(frozen=True, slots=True)
class Provider:
    name: str
    origin: Origin               # scheme, host, port, TLS files: parsed once, here
    auth_header: bytes | None    # lowercased header name
    auth_value: bytes | None
    stream_by_default: bool
    poll_prefix: str | None      # async runs: poll path up to {uid}
    poll_suffix: str
    runs_ttl_s: float
    stream_usage: str = "inject"


@dataclass(frozen=True, slots=True)
class Config:
    raw: RawConfig
    source: str
    principals: Mapping[str, Principal]        # sha256 hex → Principal
    routes: tuple[tuple[str, Provider], ...]   # (prefix, provider), longest prefix first
    prices: PriceTable
    pricing_reports: tuple[FileReport, ...] = ()

    @property
    def server(self) -> ServerConfig:
        return self.raw.server

    @property
    def store(self) -> StoreConfig:
        return self.raw.store

    @property
    def ledger(self) -> LedgerConfig:
        return self.raw.ledger

    @property
    def ledger_url(self) -> str:
        """ledger.url, or the default: meterproxy-ledger.db beside the config file (absolute)."""
        return self.raw.ledger.url or f"sqlite://{self.config_dir / 'meterproxy-ledger.db'}"

    @property
    def config_dir(self) -> Path:
        """The config file's folder (relative sqlite paths are relative to it)."""
        return Path(self.source).resolve().parent if not self.source.startswith("<") else Path.cwd()

    def route(self, path: str) -> Provider | None:
        for prefix, provider in self.routes:
            if path.startswith(prefix):
                return provider
        return None


def _nano(usd: Decimal | None) -> int | None:
    return None if usd is None else int(usd * 1_000_000_000)


def _merge(*layers: LimitsConfig | None) -> Limits:
    """Later layers override earlier ones field by field (plan, then the key's own limits)."""
    merged: dict[str, Any] = {}
    for layer in layers:
        if layer is not None:
            merged.update(layer.model_dump(exclude_none=True))
    return Limits(
        rpm=merged.get("rpm"), tpm=merged.get("tpm"), concurrency=merged.get("concurrency"),
        daily_tokens=merged.get("daily_tokens"), monthly_tokens=merged.get("monthly_tokens"),
        daily_usd_nano=_nano(merged.get("daily_usd")), monthly_usd_nano=_nano(merged.get("monthly_usd")),
    )


def substitute_env(node: Any, env: Mapping[str, str], path: str, errors: list[str]) -> Any:
    """Replace ${NAME} in every string of the parsed YAML; a missing variable is an error naming it."""
    if isinstance(node, str):
        def repl(m: re.Match[str]) -> str:
            name = m.group(1)
            if name not in env:
                errors.append(f"{path or '<root>'}: environment variable {name} is not set")
                return ""
            return env[name]
        return _ENV_RE.sub(repl, node)
    if isinstance(node, dict):
        return {k: substitute_env(v, env, f"{path}.{k}" if path else str(k), errors)
                for k, v in node.items()}
    if isinstance(node, list):
        return [substitute_env(v, env, f"{path}.{i}", errors) for i, v in enumerate(node)]
    return node


def _loc(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc) or "<root>"


def _reference_errors(data: Mapping[str, Any]) -> list[str]:
    """Names that point nowhere (a user's or key's plan), checked on the parsed mapping rather than
    the validated model, so they are reported in the same pass as field errors elsewhere."""
    plans = data.get("plans")
    known = set(plans) if isinstance(plans, dict) else set()
    errors: list[str] = []
    users, keys = data.get("users"), data.get("keys")
    entries = [*((f"users.{n}", u) for n, u in (users.items() if isinstance(users, dict) else ())),
               *((f"keys.{i}", k) for i, k in enumerate(keys if isinstance(keys, list) else ()))]
    for path, entry in entries:
        plan = entry.get("plan") if isinstance(entry, dict) else None
        if isinstance(plan, str) and plan not in known:
            errors.append(f"{path}.plan: unknown plan {plan!r}")
    return errors


def _cross_check(raw: RawConfig) -> list[str]:
    errors: list[str] = []
    seen_ids: dict[str, int] = {}
    seen_hash: dict[str, int] = {}
    for i, key in enumerate(raw.keys):
        if key.id in seen_ids:
            errors.append(f"keys.{i}.id: duplicate key id {key.id!r} (also keys.{seen_ids[key.id]})")
        seen_ids.setdefault(key.id, i)
        if key.sha256 in seen_hash:
            errors.append(f"keys.{i}.sha256: same key hash as keys.{seen_hash[key.sha256]}")
        seen_hash.setdefault(key.sha256, i)
        if raw.admin.key_sha256 is not None and key.sha256 == raw.admin.key_sha256:
            errors.append(f"keys.{i}.sha256: a client key must not be the admin key")
    owner: dict[str, str] = {}
    for name, prov in raw.providers.items():
        for j, prefix in enumerate(prov.paths):
            if prefix in owner:
                errors.append(f"providers.{name}.paths.{j}: prefix {prefix!r} already "
                              f"routed to provider {owner[prefix]!r}")
            owner.setdefault(prefix, name)
    return errors


def _load_pricing_files(raw: RawConfig, source: str,
                        errors: list[str]) -> tuple[dict[str, Price], tuple[FileReport, ...]]:
    """Prices of every pricing file (relative paths: beside the config file); later files win."""
    base = Path(source).parent if source != "<string>" else Path.cwd()
    prices: dict[str, Price] = {}
    reports: list[FileReport] = []
    yaml_prices = PriceTable({model: pc.price() for model, pc in raw.pricing.items()})
    for i, name in enumerate(raw.pricing_files):
        try:
            found, report = load_pricing_file(base / name, lambda m: yaml_prices.lookup(m) is not None)
        except ValueError as exc:
            errors.append(f"pricing_files.{i}: {exc}")
            continue
        prices.update(found)
        reports.append(report)
    return prices, tuple(reports)


def _build(raw: RawConfig, source: str, file_prices: dict[str, Price] | None = None,
           reports: tuple[FileReport, ...] = ()) -> Config:
    principals: dict[str, Principal] = {}
    for key in raw.keys:
        user_cfg = raw.users.get(key.user)
        plan_of_user = raw.plans.get(user_cfg.plan) if user_cfg and user_cfg.plan else None
        principals[key.sha256] = Principal(
            key_id=key.id, user=key.user,
            limits=_merge(raw.plans.get(key.plan) if key.plan else None, key.limits),
            user_limits=_merge(plan_of_user, user_cfg.limits if user_cfg else None),
            models=tuple(key.models) if key.models is not None else None,
        )
    routes: list[tuple[str, Provider]] = []
    for name, p in raw.providers.items():
        prefix, suffix = (None, "")
        if p.async_runs is not None:
            prefix, _, suffix = p.async_runs.poll_path.partition("{uid}")
        provider = Provider(
            name=name, origin=Origin.parse(p.base_url, p.tls_files()),
            auth_header=p.auth.header.lower().encode() if p.auth else None,
            auth_value=p.auth.value.encode() if p.auth else None,
            stream_by_default=p.stream_by_default, poll_prefix=prefix, poll_suffix=suffix,
            runs_ttl_s=p.async_runs.ttl_s if p.async_runs else 86400.0, stream_usage=p.stream_usage,
        )
        routes.extend((path, provider) for path in p.paths)
    routes.sort(key=lambda r: len(r[0]), reverse=True)
    prices = PriceTable({model: pc.price() for model, pc in raw.pricing.items()}, file_prices)
    return Config(raw=raw, source=source, principals=principals, routes=tuple(routes), prices=prices,
                  pricing_reports=reports)


def parse_config(text: str, env: Mapping[str, str] | None = None, source: str = "<string>") -> Config:
    """Parse and validate YAML text; raise ConfigError listing every problem."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"<root>: invalid YAML: {exc}"]) from exc
    if not isinstance(data, dict):
        raise ConfigError(["<root>: the config must be a YAML mapping"])
    # One pass, every error: missing variables, then field errors (none for a field whose only
    # fault is the missing variable already named), then references, then checks across fields.
    errors: list[str] = []
    data = substitute_env(data, os.environ if env is None else env, "", errors)
    unset = {e.partition(": ")[0] for e in errors}
    try:
        raw: RawConfig | None = RawConfig.model_validate(data)
    except ValidationError as exc:
        raw = None
        errors.extend(f"{_loc(e['loc'])}: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors()
                      if _loc(e["loc"]) not in unset)
    errors.extend(_reference_errors(data))
    if raw is None:
        raise ConfigError(errors)
    errors.extend(_cross_check(raw))
    file_prices, reports = _load_pricing_files(raw, source, errors)
    if errors:
        raise ConfigError(errors)
    return _build(raw, source, file_prices, reports)


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a config file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError([f"<file>: cannot read {p}: {exc.strerror}"]) from exc
    return parse_config(text, env, str(p))


def summary(cfg: Config) -> str:
    """One screen describing a loaded config, for `check-config`."""
    r = cfg.raw
    lines = [f"config OK: {cfg.source}",
             f"  store: {'redis ' + redact(r.store.url) if r.store.url else 'in-process'} "
             f"(on_error: {r.store.on_error})",
             f"  ledger: {redact(cfg.ledger_url)} (migrate: {r.ledger.migrate}, retention: "
             f"{r.ledger.retention_days} days, exporters: {len(r.ledger.export)})",
             f"  providers: {len(r.providers)}"]
    lines += [f"    {n}: {p.base_url} paths={','.join(p.paths)}" for n, p in r.providers.items()]
    lines += [f"  priced models: {len(r.pricing)}"]
    for rep in cfg.pricing_reports:
        lines.append(f"  pricing file {rep.path}: {rep.priced} models priced")
        if rep.unknown:
            lines.append(f"    unknown fields (not used for cost): {', '.join(rep.unknown)}")
    lines += [f"  plans: {', '.join(r.plans) or '-'}",
              f"  users: {len(r.users)}", f"  keys: {len(r.keys)}",
              f"  admin key: {'set' if r.admin.key_sha256 else 'not set (/admin/* disabled)'}"]
    return "\n".join(lines)
