# tutum-bridge: the bridge (default), the simulator and the worker-side tools in one image.
#
#   docker build -t tutum-bridge .
#   docker run -d -e TUTUM_USER=... -e TUTUM_APIKEY_FILE=/run/secrets/tutum-apikey \
#       -e AMQP_URL=amqp://user@rabbitmq:5672/%2F -e AMQP_PASSWORD_FILE=/run/secrets/amqp-password \
#       -v tutum-bridge-spool:/var/lib/tutum-bridge ... tutum-bridge
# (the README's "Deploying it" has the whole command, compose and Kubernetes).
#
# The spool lives in /var/lib/tutum-bridge: keep it on a volume, or events waiting for
# the broker are lost with the container. Stop it with SIGTERM (docker stop does) and a
# grace period above BRIDGE_SHUTDOWN_TIMEOUT (10 s by default; docker stop -t 30).

# Build a wheel in a throwaway stage, so the runtime image carries no build tooling.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY bridge ./bridge
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    BRIDGE_STATE_DIR=/var/lib/tutum-bridge \
    BRIDGE_METRICS_ADDR=0.0.0.0:9120
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels /wheels/tutum_bridge-*.whl \
    && rm -rf /wheels \
    && groupadd --system --gid 10001 tutum-bridge \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/tutum-bridge \
        --no-create-home --shell /usr/sbin/nologin tutum-bridge \
    && install -d -o tutum-bridge -g tutum-bridge -m 0750 /var/lib/tutum-bridge
# A numeric user, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
WORKDIR /var/lib/tutum-bridge
VOLUME ["/var/lib/tutum-bridge"]
# Metrics (/metrics) and the probes (/livez, /readyz: docs/contract.md section 9).
EXPOSE 9120
STOPSIGNAL SIGTERM
# Unhealthy when a thread of the bridge is stuck or the stream is not authenticated;
# never for a broker outage, when the bridge is doing its job (spooling) and a restart
# would lose what the stream sends meanwhile. It reads BRIDGE_METRICS_ADDR as the
# bridge does (empty: nothing to check, healthy; port 0: the port the bridge wrote).
# The start period covers opening a large spool.
HEALTHCHECK --interval=15s --timeout=10s --start-period=300s --retries=3 \
    CMD ["python", "-m", "bridge.probe"]
ENTRYPOINT ["tutum-bridge"]
CMD ["run"]
