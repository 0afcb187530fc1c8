# One image for the control plane and the data plane:
#   sluicegate-operator  (reconciler, admission webhook, broker)  - the Helm chart runs this
#   sluicegate-sidecar   (one pod's data path)                    - the webhook injects this
# The container command picks which one; there is deliberately no ENTRYPOINT.
#
#   docker build -t ghcr.io/sluicegate/sluicegate:0.1.0 .

ARG PYTHON=python:3.11-slim-bookworm
# The same Python with a C compiler and its headers, for the engine's native reader; only the venv it
# builds is copied into the final image.
ARG BUILD=python:3.11-bookworm

FROM ${BUILD} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/sluicegate
COPY pyproject.toml constraints.txt README.md hatch_build.py ./
COPY native ./native
COPY sdk ./sdk
COPY sidecar ./sidecar
COPY operator ./operator
# Versions pinned by the same constraints file the tests run with; no torch or TensorFlow in this image.
# SLUICEGATE_NATIVE=1: a failed native build fails the image rather than shipping the slower reader.
RUN SLUICEGATE_NATIVE=1 /opt/sluicegate/bin/pip install -c constraints.txt ".[sidecar,operator]"

FROM ${PYTHON}
LABEL org.opencontainers.image.title="sluicegate" \
      org.opencontainers.image.description="sluicegate operator and sidecar" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/sluicegate /opt/sluicegate
ENV PATH=/opt/sluicegate/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# A fixed non-root UID so `runAsNonRoot` can be verified by the kubelet (the chart uses 65532 too).
USER 65532:65532
CMD ["sluicegate-operator", "--help"]
