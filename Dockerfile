# syntax=docker/dockerfile:1
# Build stage: a virtualenv with mirrorgate and its dependencies, nothing else.
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY webhook ./webhook
COPY certs ./certs
COPY deploy ./deploy
RUN python -m venv /opt/mirrorgate \
 && /opt/mirrorgate/bin/pip install .

# Runtime stage: the venv on a slim base, as a non-root user with no shell needs.
FROM python:3.11-slim-bookworm
LABEL org.opencontainers.image.title="mirrorgate" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.description="Image-rewriting admission webhook for a self-hosted registry mirror"
COPY --from=build /opt/mirrorgate /opt/mirrorgate
ENV PATH=/opt/mirrorgate/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# 65532 is the conventional "nonroot" uid; the root filesystem can be mounted read-only.
USER 65532:65532
EXPOSE 8443 9090
ENTRYPOINT ["mirrorgate", "serve"]
CMD ["--config", "/etc/mirrorgate/mirrorgate.yaml", \
     "--tls-cert", "/etc/mirrorgate/tls/tls.crt", \
     "--tls-key", "/etc/mirrorgate/tls/tls.key"]
