# StyleKit: every target bootstraps the pinned host first (a no-op in about a second when done).
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
PORT   ?= 8188
PYTEST_ARGS ?=
BENCH_ARGS  ?=

HOST        ?=
HOST_LAYERS ?= tests/host tests/server tests/frontend

.PHONY: setup fixtures test test-host demo serve bench workflows models clean

setup:
	@$(PYTHON) scripts/bootstrap.py

fixtures: setup
	@$(VPY) scripts/build_fixtures.py

# pytest runs from its script, never `python -m pytest`: that would put the repo root on
# sys.path, where our nodes/ package would shadow ComfyUI's nodes.py.
test: fixtures
	@$(VENV)/bin/pytest $(PYTEST_ARGS)

# The compatibility run on another ComfyUI core (e.g. HOST=../shared/hosts/comfyui-0.33.0.tar.gz):
# a second venv with that core's own requirements and the torch of requirements/hosts/<name>.txt,
# then the host, server and frontend layers on it (fixtures are shared with the pinned run).
# HOST, HOST_LAYERS and PYTEST_ARGS reach scripts/test_host.py in the environment, not through the
# shell's command line: it splits them into words as a shell would (quotes group) and runs nothing in them.
test-host: export HOST := $(HOST)
test-host: export HOST_LAYERS := $(HOST_LAYERS)
test-host: export PYTEST_ARGS := $(PYTEST_ARGS)
test-host: fixtures
	@$(PYTHON) scripts/test_host.py

demo: setup
	@$(VPY) scripts/demo.py $(if $(filter command line environment,$(origin PORT)),--port $(PORT))

serve: setup
	@$(VPY) scripts/serve.py --port $(PORT)

bench: fixtures
	@$(VPY) scripts/bench.py $(BENCH_ARGS)

workflows: fixtures
	@$(VPY) scripts/make_workflows.py

# Model files of the workflows (workflows/models.json) into COMFYUI_PATH's models/ (default: the
# bundled ComfyUI). Standard-library Python: works before `make setup`. WORKFLOW=name for one.
WORKFLOW ?=
models:
	@$(PYTHON) scripts/fetch_models.py $(if $(WORKFLOW),--workflow $(WORKFLOW)) $(if $(COMFYUI_PATH),--comfyui "$(COMFYUI_PATH)")

clean:
	rm -rf .work out
