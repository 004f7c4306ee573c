# meterproxy image (docs/operations.md "Docker"). Build, then run with the single-host config of
# deploy/, provider keys and key hashes from the environment, the SQLite ledger in a named volume:
#   docker build -t meterproxy .
#   export METERPROXY_ADMIN_KEY_SHA256=... METERPROXY_APP_KEY_SHA256=... OPENAI_API_KEY=... ANTHROPIC_API_KEY=...
#   docker run -d --name meterproxy -p 8080:8080 \
#     -v "$PWD/deploy/single.yaml:/etc/meterproxy/config.yaml:ro" -v meterproxy-ledger:/var/lib/meterproxy \
#     -e METERPROXY_ADMIN_KEY_SHA256 -e METERPROXY_APP_KEY_SHA256 -e OPENAI_API_KEY -e ANTHROPIC_API_KEY meterproxy
# Reload the config: docker kill -s HUP meterproxy. Logs: docker logs meterproxy.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # Port the HEALTHCHECK probes; set it if `serve` listens elsewhere.
    METERPROXY_PORT=8080

# Build from a throwaway copy of the source; only the installed package stays in the image. The
# dependencies are exactly those of requirements/runtime.lock (pinned, hash-checked), then the
# package itself without resolving anything again.
COPY . /tmp/src
RUN pip install --require-hashes -r /tmp/src/requirements/runtime.lock \
    && pip install --no-deps /tmp/src && rm -rf /tmp/src

# Fixed numeric uid so orchestrators can check runAsNonRoot without resolving names.
RUN useradd --system --uid 10001 --user-group --create-home --shell /usr/sbin/nologin meterproxy \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/meterproxy
# The SQLite ledger (ledger.url in deploy/single.yaml); a new named volume inherits the owner.
VOLUME /var/lib/meterproxy
USER 10001:10001
WORKDIR /home/meterproxy

EXPOSE 8080

# No curl in -slim: probe /healthz with the interpreter that is already there.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('METERPROXY_PORT', '8080'), timeout=4)"]

ENTRYPOINT ["meterproxy"]
CMD ["serve", "--config", "/etc/meterproxy/config.yaml", "--host", "0.0.0.0"]
