# Everything runs from the virtual environment .venv at the repo root, created on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed-stamp

.PHONY: venv demo test test-unit test-e2e bench bench-plugins clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

## make demo: 10 concurrent 70 MiB uploads through Envoy + host (FULL_DUPLEX_STREAMED, STREAMED) and Envoy alone;
## table, RSS chart and samples in demo-results/. Options: make demo ARGS="-n 4 --file video.mp4".
demo: venv
	$(VENV)/bin/extproc-host demo $(ARGS)

## make test: unit tests, then end-to-end tests against a real Envoy.
test: venv
	$(VENV)/bin/python -m pytest -q -ra

test-unit: venv
	$(VENV)/bin/python -m pytest -q -ra tests/unit

test-e2e: venv
	$(VENV)/bin/python -m pytest -q -ra tests/e2e

## make bench: side-by-side benchmark (direct Envoy, minimal passthrough, host); needs wrk (apt-get install wrk).
bench: venv
	$(VENV)/bin/python benchmarks/run.py $(ARGS)

## make bench-plugins: uploads through the host with passthrough vs with file_tee, zstd and replace.
bench-plugins: venv
	$(VENV)/bin/python benchmarks/run.py --setups host --only upload \
		--plugin file_tee=benchmarks/file_tee.toml \
		--plugin zstd=benchmarks/zstd.toml \
		--plugin replace=benchmarks/replace.toml $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
