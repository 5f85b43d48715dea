# syntax=docker/dockerfile:1
# An ordinary Dockerfile: `docker build -t mirrorgate:0.1.0 .` anywhere the official Python image can be
# pulled. scripts/build-image builds this same file with buildah where no registry is reachable, on a
# stand-in for python:3.11-slim-bookworm made from Debian bookworm (see there).

# Build stage: a virtualenv with mirrorgate and its dependencies, nothing else.
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY webhook ./webhook
COPY certs ./certs
COPY deploy ./deploy
# pip and setuptools only install: they leave the venv (about 25 MB) once it holds mirrorgate, as do the
# activate scripts (nothing sources them in a container).
# Every module is compiled to bytecode here, on purpose: the runtime has PYTHONDONTWRITEBYTECODE and a
# read-only root, so it could never cache it, and would recompile the kubernetes client on every start.
# Hash-checked, not timestamp-checked (pip's default): image layers may round file times to the second,
# which leaves timestamp .pyc files looking stale; a source hash survives any copy.
RUN python -m venv /opt/mirrorgate \
 && /opt/mirrorgate/bin/pip install --no-compile . \
 && /opt/mirrorgate/bin/python -m pip uninstall --yes pip setuptools \
 && rm -f /opt/mirrorgate/bin/activate* /opt/mirrorgate/bin/Activate.ps1 \
 && /opt/mirrorgate/bin/python -m compileall -q -j 0 --invalidation-mode checked-hash /opt/mirrorgate/lib

# Runtime stage: the venv on a slim base, as a non-root user with no shell needs. Only the venv is copied:
# no source tree, no compilers, no pip cache, no build dependencies.
FROM python:3.11-slim-bookworm
LABEL org.opencontainers.image.title="mirrorgate" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.description="Image-rewriting admission webhook for a self-hosted registry mirror"
# Owned by root and not writable by the user below: the process cannot change its own code.
COPY --from=build /opt/mirrorgate /opt/mirrorgate
ENV PATH=/opt/mirrorgate/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# 65532 is the conventional "nonroot" uid; the root filesystem can be mounted read-only (nothing is
# written outside /tmp, which the deployment mounts as an emptyDir).
USER 65532:65532
EXPOSE 8443 9090
ENTRYPOINT ["mirrorgate", "serve"]
# Where `mirrorgate deploy` mounts the config map and the TLS secret (deploy/render.py).
CMD ["--config", "/etc/mirrorgate/config/mirrorgate.yaml", \
     "--tls-cert", "/etc/mirrorgate/tls/tls.crt", \
     "--tls-key", "/etc/mirrorgate/tls/tls.key"]
