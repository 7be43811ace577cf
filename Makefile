CONFIG ?= config/gateway.yaml
HOST ?= envoy
LISTEN ?= 127.0.0.1:8080
ADMIN ?= 127.0.0.1:9464
ENVOY_ADMIN ?=
VENV := .venv/bin

.PHONY: run demo test wheel-smoke image-check lint bench bench-quick bench-scaling bench-cores bench-transport bench-reload bench-breakdown bench-filters bench-stages bench-cold bench-instructions bench-lean bench-tail soak bootstrap k8s-examples

bootstrap:
	@scripts/bootstrap.sh

run: bootstrap
	@test -f $(CONFIG) || { mkdir -p $(dir $(CONFIG)) && cp config/gateway.example.yaml $(CONFIG) \
		&& echo "make run: created $(CONFIG) from config/gateway.example.yaml (your working copy, kept out of git)"; }
	$(VENV)/tollgate --config $(CONFIG) serve $(HOST) --listen $(LISTEN) --admin $(ADMIN) \
		$(if $(ENVOY_ADMIN),--envoy-admin $(ENVOY_ADMIN))

# The gateway in front of the bundled fake providers, with a key: no provider key needed.
demo: bootstrap
	$(VENV)/python scripts/demo.py --host $(HOST) --listen $(LISTEN)

# Two workers, one test file each at a time: files share their gateways within a worker.
test: bootstrap
	$(VENV)/ruff check .
	$(VENV)/python -m pytest -n 2 --dist loadfile

# The built wheel in a clean virtual environment, outside the checkout (CI runs it too).
wheel-smoke: bootstrap
	$(VENV)/python scripts/wheel_smoke.py

# The Dockerfile's image, built without a Docker engine (debootstrap and chroot; as root),
# serves a request as its user. On demand: it downloads a Debian base and every dependency.
image-check: bootstrap
	$(VENV)/python scripts/image_check.py

# ruff's lint rules (pyproject.toml). The code is laid out by hand to them, continuation
# lines aligned with their bracket, which `ruff format` would rewrite: it is not a check here.
lint: bootstrap
	$(VENV)/ruff check .

# The sequential figures against the baseline commit's, measured in the same run (flags any
# 15% worse), again with answers of 500 words (each event of a long stream), then the rest,
# then what each path adds to every event of a paced stream and to bodies of an agent's
# size, and the tail beside the baseline's (in rounds of its own).
bench: bootstrap
	$(VENV)/python -m bench.quick --requests 1000
	$(VENV)/python -m bench.quick --requests 200 --answer-words 500 --states sqlite \
		--concurrent-requests 0
	$(VENV)/python -m bench
	$(VENV)/python -m bench.paced
	$(VENV)/python -m bench.bodies
	$(VENV)/python -m bench.tail --against baseline

bench-quick: bootstrap
	$(VENV)/python -m bench.quick --concurrent-requests 0 --requests 300

# Throughput with 1 and 2 ext_proc processes, under wrk (apt-get install wrk).
bench-scaling: bootstrap
	$(VENV)/python -m bench.scaling

# How throughput grows with ext_proc processes when each has a core to itself, on a machine
# with too few: each process capped at a tenth of a CPU (cgroups; as root), 16 requests in
# flight per process, three rounds.
bench-cores: bootstrap
	$(VENV)/python -m bench.scaling --processes 1,2,3,4 --cpu-share 0.1 --per-process \
		--connections 16 --rounds 3

# What the transport between Envoy and Python costs with no work done (wrk too).
bench-transport: bootstrap
	$(VENV)/python -m bench.transport

# Instructions per request (valgrind's callgrind; apt-get install valgrind): Envoy under
# tollgate's config (a JSON answer and a stream), the decision service and the mitmproxy
# host, against bench/instructions.json.
bench-instructions: bootstrap
	$(VENV)/python -m bench.instructions

# Where the Envoy host's added time goes, stage by stage (Envoy's access log), beside plain
# Envoy's and the host's floor (its decision service replaying one decision), the decision
# service's own time, and what each layer adds (the exchange with another process, the Lua
# filters, the Python service doing no work, the decision).
bench-breakdown: bootstrap
	$(VENV)/python -m bench.breakdown

# What each part of tollgate's Envoy filters costs the client's p50 (the meter, the access
# log of responses' ends, the client head the decide filter sends), with no decision.
bench-filters: bootstrap
	$(VENV)/python -m bench.filters

# The decision service's time by function, cold: each function a request decided from a
# precedent runs through (sys.monitoring on those functions alone), its meter post and its
# settlement too.
bench-stages: bootstrap
	$(VENV)/python -m bench.stages

# The decision service's time on a request decided from a precedent, in one process (no
# Envoy), with the caches emptied before each step and not: figures that repeat within a few
# percent. `make bench-cold AGAINST=REV` measures REV's code beside this checkout's.
bench-cold: bootstrap
	$(VENV)/python -m bench.cold --functions $(if $(AGAINST),--against $(AGAINST))

# Requests one at a time: the Envoy host's p99 and slowest beside the direct call's and plain
# Envoy's, and how in step its slowest are with the access log's batches.
# `make bench-tail AGAINST=REV` measures REV's code in rounds of its own, alternating.
bench-tail: bootstrap
	$(VENV)/python -m bench.tail $(if $(AGAINST),--against $(AGAINST))

# One request at a time under wrk (apt-get install wrk): what each path adds when the client
# costs next to nothing (bench-quick's is Python), and each host over its plain proxy.
bench-lean: bootstrap
	$(VENV)/python -m bench.lean

# What config reloads (a config of a few hundred keys, changed twice a second) cost requests.
bench-reload: bootstrap
	$(VENV)/python -m bench.reload

# 500 concurrent streams a round through each host, on SQLite, then on Redis (as on Kubernetes).
soak: bootstrap
	$(VENV)/python -m bench.soak
	$(VENV)/python -m bench.soak --state redis

# envoy/kubernetes/{sidecar,istio}.yaml from envoy/kubernetes/gateway.yaml (kept current by a test).
k8s-examples: bootstrap
	$(VENV)/python scripts/k8s_examples.py
