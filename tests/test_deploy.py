"""deploy/: promtool validates the Prometheus config and alerts (and runs the alert unit tests);
compose.yaml and the Dockerfile have the shape the README promises."""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import yaml

from tests.dashboard_queries import SPEC_METRICS
from tests.procs import ROOT

DEPLOY = ROOT / "deploy"


def _promtool(*args: str, cwd: Path = ROOT) -> str:
    exe = shutil.which("promtool")
    assert exe, "promtool is required (Debian package prometheus)"
    proc = subprocess.run([exe, *args], capture_output=True, text=True, cwd=str(cwd), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def _compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return doc


def test_promtool_check_config() -> None:
    # Also checks alerts.yml, resolved relative to prometheus.yml.
    out = _promtool("check", "config", "deploy/prometheus.yml")
    assert "SUCCESS: 1 rule files found" in out


def test_promtool_check_rules() -> None:
    out = _promtool("check", "rules", "deploy/alerts.yml")
    assert re.search(r"SUCCESS: \d+ rules found", out)


def test_promtool_alert_unit_tests() -> None:
    out = _promtool("test", "rules", "alerts_test.yml", cwd=DEPLOY)
    assert "SUCCESS" in out


def test_prometheus_scrapes_the_proxy() -> None:
    cfg = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    assert cfg["rule_files"] == ["alerts.yml"]
    [job] = cfg["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["scrape_interval"] == "15s"
    assert job["static_configs"] == [{"targets": ["proxy:8080"]}]


def test_alerts_cover_the_brief_and_use_spec_metrics() -> None:
    doc = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
    rules = [r for g in doc["groups"] for r in g["rules"]]
    alerts = {r["alert"]: r["expr"] for r in rules if "alert" in r}
    recorded = {r["record"] for r in rules if "record" in r}
    assert {"MeterproxyHighErrorRatio", "MeterproxyStoreDown", "MeterproxyUsageBacklogGrowing",
            "MeterproxyUserNearMonthlyBudget"} <= set(alerts)
    for r in rules:
        for name in re.findall(r"\bmeterproxy_[a-z_]+", r["expr"]):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            assert name in SPEC_METRICS or base in SPEC_METRICS, name
        for name in re.findall(r"\bmeterproxy:[a-z_0-9:]+", r["expr"]):
            assert name in recorded, name


def test_compose_services() -> None:
    services = _compose()["services"]
    assert set(services) == {"proxy", "redis", "postgres", "prometheus", "grafana"}

    proxy = services["proxy"]
    assert proxy["build"]["context"] == ".."
    assert (DEPLOY / proxy["build"]["context"] / proxy["build"]["dockerfile"]).is_file()
    # The image's ENTRYPOINT is `meterproxy`, so command holds only its arguments.
    assert proxy["command"] == ["serve", "--config", "/etc/meterproxy/config.yaml",
                                "--host", "0.0.0.0", "--port", "8080", "--workers", "2"]
    assert {"OPENAI_API_KEY", "VENDORX_KEY", "RUNS_KEY"} <= set(proxy["environment"])
    mounts = [v.split(":") for v in proxy["volumes"]]
    assert ["../policies", "/etc/meterproxy/policies", "ro"] in mounts
    assert any(m[-2] == "/etc/meterproxy/config.yaml" for m in mounts)
    assert proxy["depends_on"]["redis"]["condition"] == "service_healthy"
    assert proxy["depends_on"]["postgres"]["condition"] == "service_healthy"

    pg = services["postgres"]
    assert pg["image"].startswith("postgres:")
    assert any(v.endswith(":/var/lib/postgresql/data") for v in pg["volumes"])
    assert "pg_isready" in pg["healthcheck"]["test"]

    redis = services["redis"]
    assert redis["image"].startswith("redis:7")
    cmd = redis["command"]
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in redis["volumes"])

    prom = services["prometheus"]
    assert prom["image"].startswith("prom/prometheus")
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prom["volumes"]
    assert "./alerts.yml:/etc/prometheus/alerts.yml:ro" in prom["volumes"]

    grafana = services["grafana"]
    assert grafana["image"].startswith("grafana/grafana")
    assert "../dashboards/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
    assert any(v.startswith("../dashboards/meterproxy.json:/var/lib/grafana/dashboards/")
               for v in grafana["volumes"])


_INTERP_RE = re.compile(r"\$\{(\w+)(?::([-?])([^}]*))?\}")


def _interpolate(value: str) -> str:
    """Compose-style `${VAR:-default}` / `${VAR:?msg}` with an empty environment: defaults are
    taken; a required VAR gets sha256(VAR) as a stand-in (its secrets are all sha256 hashes)."""

    def repl(m: re.Match[str]) -> str:
        assert m.group(2) in {"-", "?"}, f"{m.group(0)}: give every variable a default or :?"
        if m.group(2) == "-":
            return m.group(3)
        return hashlib.sha256(m.group(1).encode()).hexdigest()

    return _INTERP_RE.sub(repl, value)


def test_compose_bind_mounts_exist() -> None:
    """Every relative bind source exists, with compose's defaults for overridable paths."""
    for name, svc in _compose()["services"].items():
        for vol in svc.get("volumes", []):
            src = _interpolate(vol).split(":")[0]
            if src.startswith("."):
                assert (DEPLOY / src).exists(), (name, src)


def _proxy_env() -> dict[str, str]:
    """The proxy's container environment, required secrets replaced by distinct sha256s."""
    env = _compose()["services"]["proxy"]["environment"]
    return {k: _interpolate(str(v)) for k, v in env.items()}


def test_compose_config_is_valid_for_the_proxy() -> None:
    """deploy/config.yaml passes `meterproxy check-config` with exactly compose's environment."""
    env = {"PATH": "/usr/bin:/bin", **_proxy_env()}
    proc = subprocess.run([sys.executable, "-m", "meterproxy", "check-config",
                           str(DEPLOY / "config.yaml")], env=env, cwd=str(ROOT),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cfg = yaml.safe_load((DEPLOY / "config.yaml").read_text())
    assert cfg["store"]["url"] == "redis://redis:6379/0"  # the compose services
    assert cfg["ledger"]["url"].startswith("postgresql://meterproxy:${POSTGRES_PASSWORD}@postgres:5432/")
    assert "ledger: postgresql://meterproxy:***@postgres:5432/meterproxy" in proc.stdout   # password hidden


def test_budget_series_mirror_the_config() -> None:
    """alerts.yml's per-user budgets equal the users' monthly_usd in deploy/config.yaml."""
    cfg = yaml.safe_load((DEPLOY / "config.yaml").read_text())
    want = {}
    for user, u in cfg["users"].items():
        limits = {**cfg["plans"].get(u.get("plan"), {}), **(u.get("limits") or {})}
        if "monthly_usd" in limits:
            want[user] = float(limits["monthly_usd"])
    doc = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
    got = {}
    for g in doc["groups"]:
        for r in g["rules"]:
            if r.get("record") == "meterproxy:user_monthly_budget_usd":
                m = re.fullmatch(r"vector\(([0-9.]+)\)", r["expr"])
                assert m, r["expr"]
                got[r["labels"]["user"]] = float(m.group(1))
    assert got == want


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) per instruction, continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for ln in joined.splitlines():
        if ln.strip():
            instr, _, rest = ln.strip().partition(" ")
            out.append((instr.upper(), rest.strip()))
    return out


def test_dockerfile() -> None:
    instrs = _dockerfile()
    by = {i: a for i, a in instrs}  # last one wins, as in Docker
    assert by["FROM"].startswith("python:3.11-slim")
    user = by["USER"].split(":")[0]
    assert user not in {"root", "0"}
    assert json.loads(by["ENTRYPOINT"]) == ["meterproxy"]
    assert json.loads(by["CMD"]) == ["serve", "--config", "/etc/meterproxy/config.yaml",
                                     "--host", "0.0.0.0"]
    health = by["HEALTHCHECK"]
    assert "/healthz" in health and "python" in health and "curl" not in health
    # The image installs the locked dependencies, hash-checked, and nothing resolved anew.
    installs = [a for i, a in instrs if i == "RUN" and "pip install" in a]
    assert installs == [installs[0]] and re.search(
        r"pip install --require-hashes -r /tmp/src/requirements/runtime\.lock\s+&& pip install --no-deps /tmp/src\s",
        installs[0]), installs
    # USER comes after the installs, so the running process is not root.
    order = [i for i, _ in instrs]
    assert order.index("USER") > max(k for k, i in enumerate(order) if i == "RUN")


def test_healthcheck_probe_runs() -> None:
    """The HEALTHCHECK's python one-liner succeeds against a live /healthz and fails without one."""
    health = _dockerfile()
    cmd = json.loads(dict(health)["HEALTHCHECK"].split("CMD", 1)[1])
    assert cmd[:2] == ["python", "-c"]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        ok = subprocess.run([sys.executable, "-c", cmd[2]], env={"METERPROXY_PORT": str(port)},
                            capture_output=True, timeout=30)
        assert ok.returncode == 0, ok.stderr
    finally:
        server.shutdown()
        server.server_close()
    bad = subprocess.run([sys.executable, "-c", cmd[2]], env={"METERPROXY_PORT": str(port)},
                         capture_output=True, timeout=30)
    assert bad.returncode != 0


def test_dockerignore_keeps_build_inputs() -> None:
    ignored = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")}
    assert {".git", ".venv", "tests"} <= ignored
    assert not {"meterproxy", "pyproject.toml", "README.md"} & ignored


# --- single host: deploy/single.yaml, the Dockerfile's example, the systemd unit (issue #13) ---

SINGLE = DEPLOY / "single.yaml"
LEDGER_DIR = "/var/lib/meterproxy"


def _header_command(path: Path) -> str:
    [cmd] = [ln.removeprefix("#").strip() for ln in path.read_text().splitlines()[:12]
             if "meterproxy check-config" in ln]
    return cmd


def _env_vars(path: Path) -> set[str]:
    return set(re.findall(r"\$\{(\w+)\}", "\n".join(
        ln.split("#")[0] for ln in path.read_text().splitlines())))


def test_single_host_config_validates_with_its_header_command(tmp_path: Path) -> None:
    cmd = _header_command(SINGLE).replace("deploy/single.yaml", str(SINGLE))
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    p = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, cwd=str(ROOT), env=env, timeout=60)
    assert p.returncode == 0 and "config OK" in p.stdout, p.stdout + p.stderr
    assert _env_vars(SINGLE) == {n for n in re.findall(r"\b([A-Z][A-Z0-9_]*)=", cmd)}
    doc = yaml.safe_load(SINGLE.read_text())
    assert "url" not in doc.get("store", {})          # in-process limiter: one process
    assert doc["ledger"]["url"] == f"sqlite:///{LEDGER_DIR}/ledger.db"
    assert doc["server"]["host"] == "0.0.0.0"


def test_dockerfile_example_matches_the_image_and_config() -> None:
    text = (ROOT / "Dockerfile").read_text()
    example = re.sub(r"\\\n#\s*", " ", text)
    [run] = [ln for ln in example.splitlines() if "docker run" in ln]
    mounts = [m.split(":") for m in re.findall(r'-v "?([^" ]+)"?', run)]
    assert ["$PWD/deploy/single.yaml", "/etc/meterproxy/config.yaml", "ro"] in mounts
    assert ["meterproxy-ledger", LEDGER_DIR] in mounts
    # Every variable the config needs is passed from the environment, and nothing else.
    assert set(re.findall(r"-e (\w+)", run)) == _env_vars(SINGLE)
    by = dict(_dockerfile())
    assert json.loads(by["VOLUME"]) if by["VOLUME"].startswith("[") else by["VOLUME"] == LEDGER_DIR
    assert f"install -d -o 10001 -g 10001 -m 0750 {LEDGER_DIR}" in by["RUN"]
    assert json.loads(by["CMD"])[2] == "/etc/meterproxy/config.yaml"
    assert "docker kill -s HUP" in text


def _context_files() -> list[Path]:
    """The Docker build context: files of the repository not excluded by .dockerignore (its
    patterns here are names at the top level or `**/name` / `*.ext` anywhere)."""
    pats = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
            if ln.strip() and not ln.startswith("#")]
    tracked = subprocess.run(["git", "ls-files"], cwd=str(ROOT), capture_output=True, text=True,
                             check=True).stdout.split()
    out = []
    for rel in tracked:
        parts = Path(rel).parts
        if any(parts[0] == p or (p.startswith("**/") and p[3:] in parts)
               or Path(rel).match(p.removeprefix("**/")) for p in pats):
            continue
        out.append(Path(rel))
    return out


def test_build_context_installs_as_a_package(tmp_path: Path) -> None:
    """What the Dockerfile's `pip install /tmp/src` does, without a Docker engine or a network: a
    non-editable install of the build context into a fresh prefix (build backend and dependencies
    from this environment); the installed copy, not this checkout, runs and has its Lua scripts."""
    ctx = tmp_path / "src"
    for rel in _context_files():
        (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, ctx / rel)
    assert (ctx / "pyproject.toml").is_file() and not (ctx / "tests").exists()
    assert (ctx / "requirements" / "runtime.lock").is_file()   # what the Dockerfile installs first
    prefix = tmp_path / "prefix"
    # --ignore-installed: without it pip uninstalls this environment's own (editable) meterproxy.
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--ignore-installed", "--no-deps",
                          "--no-build-isolation", "--no-index", "--prefix", str(prefix), str(ctx)],
                         capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert pip.returncode == 0, pip.stderr
    [site] = list(prefix.glob("lib/python3*/site-packages"))
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c",
                            "import meterproxy, pathlib; p = pathlib.Path(meterproxy.__file__).parent; "
                            "print(p); print(sorted(x.name for x in (p / 'limits').glob('*.lua')))"],
                           capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=60)
    assert where.returncode == 0, where.stderr
    assert where.stdout.startswith(str(site)) and "admit.lua" in where.stdout and "settle.lua" in where.stdout
    ok = subprocess.run([str(prefix / "bin" / "meterproxy"), "check-config", str(ROOT / "policies" / "demo.yaml")],
                        capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=60)
    assert ok.returncode == 0 and "config OK" in ok.stdout, ok.stderr


def _unit() -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for ln in (DEPLOY / "meterproxy.service").read_text().splitlines():
        ln = ln.strip()
        if not ln or ln.startswith("#"):
            continue
        if ln.startswith("["):
            current = sections.setdefault(ln.strip("[]"), {})
        else:
            k, _, v = ln.partition("=")
            current.setdefault(k, []).append(v)
    return sections


def test_systemd_unit() -> None:
    svc = _unit()["Service"]
    assert svc["User"] == ["meterproxy"] and svc["Group"] == ["meterproxy"]
    assert svc["StateDirectory"] == ["meterproxy"]          # /var/lib/meterproxy, owned by User
    assert svc["Restart"] == ["on-failure"]
    assert svc["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert svc["ExecStart"] == ["/opt/meterproxy/bin/meterproxy serve --config /etc/meterproxy/config.yaml"]
    assert svc["EnvironmentFile"] == ["/etc/meterproxy/env"]
    # Longer than the drain (shutdown_grace_s 30 + as long for the ledger flush).
    assert int(svc["TimeoutStopSec"][0]) > 60
    assert _unit()["Install"]["WantedBy"] == ["multi-user.target"]


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """systemd-analyze accepts the unit (with ExecStart pointed at this venv's meterproxy)."""
    exe = shutil.which("systemd-analyze")
    assert exe, "systemd-analyze is required (Debian package systemd)"
    unit = tmp_path / "meterproxy.service"
    unit.write_text((DEPLOY / "meterproxy.service").read_text().replace(
        "/opt/meterproxy/bin/meterproxy", str(Path(sys.executable).parent / "meterproxy")))
    p = subprocess.run([exe, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stderr.strip() == "", p.stderr
