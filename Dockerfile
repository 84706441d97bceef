# syntax=docker/dockerfile:1
# The image of one CSX service: one recipe for all four, chosen by SERVICE (required). Build from the
# repository root (the context needs uv.lock and libs/; .dockerignore leaves out everything else):
#
#   docker build --build-arg SERVICE=referrals -t csx-referrals:0.1.0 .
#
# SERVICE is one of referrals, panel, conferences, actionplans. Stages: contracts (Python generated
# from protos/, as `make gen` does) -> build (a virtualenv holding the service, libs/common,
# libs/client, the generated contracts and their dependencies at the versions in uv.lock, installed
# as wheels) -> runtime (that virtualenv on a slim Python, non-root, nothing written at run time, so
# it runs with a read-only root filesystem).
#
# Run: csx-<service> (the default command, as csx-service); migrations: python -m csx_<service>.migrate;
# health: python /opt/csx/grpc_health_check.py --address 127.0.0.1:50051.
#
# tests/deploy/test_images.py rebuilds the build stage's virtualenv from exactly what this file
# copies (the same uv sync commands, no Docker engine) and imports each service from it.
ARG PYTHON_IMAGE=python:3.11-slim-trixie
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.9

FROM ${UV_IMAGE} AS uv

# --- generated contracts (the same for every service) ----------------------------------------------
FROM ${PYTHON_IMAGE} AS contracts
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_DOWNLOADS=never UV_LINK_MODE=copy
WORKDIR /src
# uv needs every workspace member's pyproject.toml (the root's members are libs/* and services/*).
COPY pyproject.toml uv.lock ./
COPY libs/cli/pyproject.toml libs/cli/
COPY libs/client/pyproject.toml libs/client/
COPY libs/common/pyproject.toml libs/common/
COPY libs/contracts/pyproject.toml libs/contracts/
COPY libs/safeguarding/pyproject.toml libs/safeguarding/
COPY services/referrals/pyproject.toml services/referrals/
COPY services/panel/pyproject.toml services/panel/
COPY services/conferences/pyproject.toml services/conferences/
COPY services/actionplans/pyproject.toml services/actionplans/
# Only the code generators, pinned by uv.lock (the rest of the dev group is not needed here).
RUN uv export --frozen --all-packages --all-groups --no-hashes --no-emit-workspace -o /tmp/constraints.txt \
 && uv venv --quiet /opt/gen \
 && VIRTUAL_ENV=/opt/gen uv pip install --quiet --constraint /tmp/constraints.txt \
      grpcio-tools mypy-protobuf protovalidate
COPY protos protos
COPY tools/gen_protos.py tools/
RUN /opt/gen/bin/python tools/gen_protos.py

# --- the service's virtualenv ----------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build
# An ARG declared before the first FROM is not visible inside a stage, so each stage that uses
# SERVICE declares it. RUN sees it as an environment variable.
ARG SERVICE
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_DOWNLOADS=never UV_LINK_MODE=copy UV_COMPILE_BYTECODE=1 \
    UV_PROJECT_ENVIRONMENT=/opt/csx/venv UV_PYTHON=/usr/local/bin/python3
WORKDIR /src
COPY pyproject.toml uv.lock ./
COPY libs/cli/pyproject.toml libs/cli/
COPY libs/client/pyproject.toml libs/client/
COPY libs/common/pyproject.toml libs/common/
COPY libs/contracts/pyproject.toml libs/contracts/
COPY libs/safeguarding/pyproject.toml libs/safeguarding/
COPY services/referrals/pyproject.toml services/referrals/
COPY services/panel/pyproject.toml services/panel/
COPY services/conferences/pyproject.toml services/conferences/
COPY services/actionplans/pyproject.toml services/actionplans/
RUN test -n "${SERVICE}" && test -f "services/${SERVICE}/pyproject.toml" \
 || { echo "--build-arg SERVICE=referrals|panel|conferences|actionplans is required (got '${SERVICE}')" >&2; exit 1; }
# Third-party dependencies first: this layer is rebuilt only when uv.lock changes.
RUN uv sync --frozen --no-dev --no-install-workspace --package csx-${SERVICE}
COPY --from=contracts /src/libs/contracts/src libs/contracts/src
# Every workspace library the service depends on: csx-common, csx-safeguarding, and csx-client
# (csx-common takes the sealed-intake wire format from it). Not libs/cli: no service depends on it.
COPY libs/client/src libs/client/src
COPY libs/common/src libs/common/src
COPY libs/safeguarding/src libs/safeguarding/src
COPY services/${SERVICE}/src services/${SERVICE}/src
# The service, its libraries and the contracts, as wheels (not editable: /src is not in the image).
RUN uv sync --frozen --no-dev --no-editable --package csx-${SERVICE}
# CMD in exec form cannot expand ${SERVICE}, and a shell form would put sh between the container's
# signals and the service. So the build gives the service's console script one fixed name,
# csx-service, beside it in the virtualenv, and the runtime stage runs that.
RUN ln -s "csx-${SERVICE}" "${UV_PROJECT_ENVIRONMENT}/bin/csx-service" \
 && test -x "${UV_PROJECT_ENVIRONMENT}/bin/csx-service"

# --- runtime ---------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ARG SERVICE
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="csx-${SERVICE}" \
      org.opencontainers.image.description="CSX ${SERVICE} service" \
      org.opencontainers.image.version="${VERSION}"
RUN groupadd --system --gid 10001 csx \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin csx
COPY --from=build /opt/csx/venv /opt/csx/venv
COPY deploy/docker/grpc_health_check.py /opt/csx/grpc_health_check.py
ENV PATH=/opt/csx/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONFAULTHANDLER=1
USER 10001:10001
WORKDIR /tmp
EXPOSE 50051
# SIGTERM: health NOT_SERVING, gRPC drains, consumers and relay stop, NATS drains.
STOPSIGNAL SIGTERM
# csx-service is csx-${SERVICE} (a symlink made in the build stage). The Helm chart runs
# csx-<service> by name; both are on PATH.
CMD ["csx-service"]
