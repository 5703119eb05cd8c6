# tutum-bridge: the bridge (default), the simulator and the worker-side tools in one image.
#
#   docker build -t tutum-bridge .
#   docker run --rm -e TUTUM_USER=... -e TUTUM_APIKEY_FILE=/run/secrets/apikey \
#       -e AMQP_URL=amqp://user:pass@rabbitmq:5672/%2F -v tutum-bridge-spool:/var/lib/tutum-bridge \
#       tutum-bridge
#
# The spool lives in /var/lib/tutum-bridge: keep it on a volume, or events waiting for
# the broker are lost with the container. Stop it with SIGTERM (docker stop does) and a
# grace period above BRIDGE_SHUTDOWN_TIMEOUT (10 s by default; docker stop -t 30).

# Build a wheel in a throwaway stage, so the runtime image carries no build tooling.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY bridge ./bridge
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    BRIDGE_STATE_DIR=/var/lib/tutum-bridge \
    BRIDGE_METRICS_ADDR=0.0.0.0:9120
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels tutum-bridge \
    && rm -rf /wheels \
    && groupadd --system --gid 10001 tutum-bridge \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/tutum-bridge \
        --no-create-home --shell /usr/sbin/nologin tutum-bridge \
    && install -d -o tutum-bridge -g tutum-bridge -m 0750 /var/lib/tutum-bridge
# A numeric user, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
WORKDIR /var/lib/tutum-bridge
VOLUME ["/var/lib/tutum-bridge"]
# Metrics (/metrics) and health (/healthz) for Prometheus and the probes below.
EXPOSE 9120
STOPSIGNAL SIGTERM
# 200 while connected to both the stream and the broker, 503 otherwise: any error exits 1.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('BRIDGE_METRICS_ADDR', '').rpartition(':')[2] or '9120'; urllib.request.urlopen('http://127.0.0.1:' + port + '/healthz', timeout=4)"]
ENTRYPOINT ["tutum-bridge"]
CMD ["run"]
