# meterproxy image: `docker build -t meterproxy .` then
#   docker run -v ./policies/demo.yaml:/etc/meterproxy/config.yaml:ro -p 8080:8080 meterproxy
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # Port the HEALTHCHECK probes; set it if `serve` listens elsewhere.
    METERPROXY_PORT=8080

# Build from a throwaway copy of the source; only the installed package stays in the image.
COPY . /tmp/src
RUN pip install /tmp/src && rm -rf /tmp/src

# Fixed numeric uid so orchestrators can check runAsNonRoot without resolving names.
RUN useradd --system --uid 10001 --user-group --create-home --shell /usr/sbin/nologin meterproxy
USER 10001:10001
WORKDIR /home/meterproxy

EXPOSE 8080

# No curl in -slim: probe /healthz with the interpreter that is already there.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('METERPROXY_PORT', '8080'), timeout=4)"]

ENTRYPOINT ["meterproxy"]
CMD ["serve", "--config", "/etc/meterproxy/config.yaml", "--host", "0.0.0.0"]
