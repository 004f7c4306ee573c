"""A private CA with a server certificate for localhost and a client certificate (openssl CLI)."""

from __future__ import annotations

import subprocess
from pathlib import Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_pki(d: Path) -> dict[str, Path]:
    """ca.pem, server.pem/.key (CN and SAN localhost), client.pem/.key, both signed by the CA."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"),
             "-days", "1", "-subj", "/CN=meterproxy test CA")
    (d / "san.ext").write_text("subjectAltName=DNS:localhost\n")
    for name, cn in (("server", "localhost"), ("client", "meterproxy")):
        _openssl("req", *ec, "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"),
                 "-subj", f"/CN={cn}")
        _openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.pem"),
                 "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-out", str(d / f"{name}.pem"),
                 "-days", "1", *(["-extfile", str(d / "san.ext")] if name == "server" else []))
    return {n: d / n for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}
