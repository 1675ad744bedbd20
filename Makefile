# Everything runs from the virtual environment .venv at the repo root, created on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed-stamp

.PHONY: constraints venv demo test lint test-unit test-e2e bench bench-mixed bench-plugins bench-workers bench-metrics bench-tracing bench-modes bench-storm bench-observe envoy-configs clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[dev]'
	@# xds-protos ships a 2021 copy of opentelemetry-proto's modules under the same names
	@# (grpc/grpc#42926) and pip may install it last: put opentelemetry-proto's own back.
	$(VENV)/bin/python -m pip install --quiet --force-reinstall --no-deps \
		"opentelemetry-proto==$$($(VENV)/bin/python -c 'from importlib.metadata import version; print(version("opentelemetry-proto"))')"
	touch $(STAMP)

## make demo: 10 concurrent 70 MiB uploads through Envoy + host (FULL_DUPLEX_STREAMED, STREAMED) and Envoy alone;
## table, RSS chart and samples in demo-results/. Options: make demo ARGS="-n 4 --file video.mp4".
demo: venv
	$(VENV)/bin/extproc-host demo $(ARGS)

## make test: lint and type checks, then unit tests and end-to-end tests against a real Envoy.
test: lint
	$(VENV)/bin/python -m pytest -q -ra

## make lint: ruff (lint, format, import order), zizmor (the GitHub workflows: schema and security, offline)
## and mypy (strict on the serving core).
LINTED := host plugins tests benchmarks examples .github
lint: venv
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)
	$(VENV)/bin/zizmor --offline --strict-collection --quiet .github/workflows
	@# mypy reads the packages under their installed names: extproc_host is host/, extproc_host_plugins is plugins/.
	mkdir -p build/typecheck
	ln -sfn ../../host build/typecheck/extproc_host
	ln -sfn ../../plugins build/typecheck/extproc_host_plugins
	$(VENV)/bin/mypy -p extproc_host -p extproc_host_plugins

test-unit: venv
	$(VENV)/bin/python -m pytest -q -ra tests/unit

test-e2e: venv
	$(VENV)/bin/python -m pytest -q -ra tests/e2e

## make bench: side-by-side benchmark (direct Envoy, minimal passthrough, host, and the host on grpc.aio): uploads, wrk small requests with server CPU
## per request, open-loop latency at 200 and 800 req/s; then mixed traffic (bench-mixed); needs wrk (apt-get install wrk).
bench: venv
	$(VENV)/bin/python benchmarks/run.py --plugin host-grpcio=benchmarks/grpcio.toml $(ARGS)
	$(VENV)/bin/python benchmarks/mixed.py $(MIXED_ARGS)

## make bench-mixed: 1 in 10 requests JSON: a JSON-only plugin skipping the other bodies (mode override) vs routes that get every body.
bench-mixed: venv
	$(VENV)/bin/python benchmarks/mixed.py $(MIXED_ARGS)

## make bench-plugins: uploads through the host with passthrough vs with file_tee, zstd and replace.
bench-plugins: venv
	$(VENV)/bin/python benchmarks/run.py --setups host --only upload \
		--plugin file_tee=benchmarks/file_tee.toml \
		--plugin zstd=benchmarks/zstd.toml \
		--plugin replace=benchmarks/replace.toml $(ARGS)

## make bench-workers: the host with one process vs --workers 2 (SO_REUSEPORT), same Envoy, same load.
bench-workers: venv
	$(VENV)/bin/python benchmarks/run.py --setups host --host-workers 2 $(ARGS)

## make bench-metrics: the host with Prometheus metrics on vs off (passthrough chains).
bench-metrics: venv
	$(VENV)/bin/python benchmarks/run.py --setups host --plugin metrics=benchmarks/metrics.toml $(ARGS)

## make bench-tracing: the host with OpenTelemetry traces on (every stream, exported to a local OTLP sink) vs off.
bench-tracing: venv
	$(VENV)/bin/python benchmarks/tracing.py $(ARGS)

## make bench-modes: a response-body-only chain behind its generated Envoy config vs the same chain with everything sent.
bench-modes: venv
	$(VENV)/bin/python benchmarks/run.py --setups host --only upload,small-fd --generate-envoy \
		--host-config benchmarks/send_everything.toml \
		--plugin response-only=benchmarks/response_only.toml $(ARGS)

## make bench-storm: 300 streams whose answers are never read, then cancelled: host RSS idle, peak, after; limits hit.
bench-storm: venv
	$(VENV)/bin/python benchmarks/storm.py $(ARGS)

## make bench-observe: observe-only routes (observability mode) vs full duplex, with and without a slow observer.
bench-observe: venv
	$(VENV)/bin/python benchmarks/observe.py $(ARGS)

## make envoy-configs: regenerate envoy/*.yaml from config/*.toml (tests fail when they are stale).
# EXTPROC_* environment overrides are left out: the files must depend on config/ alone.
ENVOY_CONFIG := env $(foreach v,$(filter EXTPROC_%,$(.VARIABLES)),-u $(v)) $(VENV)/bin/extproc-host envoy-config
envoy-configs: venv
	$(ENVOY_CONFIG) --config config/full_duplex.toml -o envoy/full_duplex.yaml
	$(ENVOY_CONFIG) --config config/streamed.toml -o envoy/streamed.yaml
	$(ENVOY_CONFIG) --config config/zstd.toml -o envoy/zstd.yaml
	$(ENVOY_CONFIG) --config config/full_duplex.toml --no-ext-proc -o envoy/direct.yaml
	$(ENVOY_CONFIG) --config config/full_duplex.toml --host-address host:9001 --upstream echo:8080 --health-check 2 -o envoy/compose.yaml
	$(ENVOY_CONFIG) --config deploy/host.toml --listen 0.0.0.0:10000 --admin-address 0.0.0.0 \
		--host-address extproc-host:9001 --upstream echo:8080 --health-check 2 -o deploy/envoy.yaml

## make constraints: regenerate constraints.txt (the image's pinned versions) from a clean install of '.[stack,tracing]'.
constraints:
	rm -rf build/constraints-venv build/constraints-wheel
	$(PYTHON) -m venv build/constraints-venv
	build/constraints-venv/bin/pip install --quiet --upgrade pip
	build/constraints-venv/bin/pip wheel --quiet --no-deps -w build/constraints-wheel .
	build/constraints-venv/bin/pip install --quiet "$$(ls build/constraints-wheel/extproc_host-*.whl)[stack,tracing]"
	{ echo "# Versions the container image installs (pip install -c constraints.txt), from a clean install of"; \
	  echo "# '.[stack,tracing]' on Python 3.11: regenerate with make constraints (a test checks every runtime dependency is pinned)."; \
	  build/constraints-venv/bin/pip freeze --exclude extproc-host; } > constraints.txt
	rm -rf build/constraints-venv build/constraints-wheel

clean:
	rm -rf $(VENV) build *.egg-info
