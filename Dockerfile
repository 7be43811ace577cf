# The tollgate image: what `tollgate envoy k8s sidecar|istio` runs as its native sidecar
# (`tollgate serve extproc`), and `serve envoy`, `serve mitmproxy` and the CLI.
#
#   docker build -t registry.example.com/tollgate:0.1.0 .
#
# On Debian's own Python 3.13: built with profile guidance and LTO, and with libpython
# linked into the executable. ext_proc's CPU per request is mostly the interpreter's, and
# this build spends less of it than a shared or unoptimized one (envoy/README.md, "The
# interpreter ext_proc runs on"): the official `python` images link libpython as a shared
# library.
FROM debian:trixie-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

COPY pyproject.toml README.md LICENSE /src/
COPY tollgate /src/tollgate
COPY extproc /src/extproc
COPY addon /src/addon
# The second install: xds-protos ships an old copy of opentelemetry-proto's files, which the
# OTLP exporters cannot load (README, "Installing it as a package").
RUN python3 -m venv /opt/tollgate \
    && /opt/tollgate/bin/pip install --no-cache-dir /src \
    && /opt/tollgate/bin/pip install --no-cache-dir --force-reinstall --no-deps \
        "opentelemetry-proto==$(/opt/tollgate/bin/python -c \
        'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')" \
    && rm -rf /src

ENV PATH=/opt/tollgate/bin:$PATH
# The sidecar shape's user (its manifests' runAsUser; Istio's run it as istio-proxy's), who
# owns ext_proc's socket. The root file system is read-only there: what the gateway writes
# goes to TOLLGATE_STATE_DIR.
USER 10001:10001
ENTRYPOINT ["tollgate"]
CMD ["--help"]
