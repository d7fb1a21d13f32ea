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
test-host: fixtures
	@test -n "$(HOST)" || { echo "usage: make test-host HOST=../shared/hosts/comfyui-0.33.0.tar.gz"; exit 2; }
	@set -e; out=$$($(PYTHON) scripts/host_venv.py "$(HOST)"); host=$$(echo "$$out" | sed -n 1p); \
	  venv=$$(echo "$$out" | sed -n 2p); \
	  COMFYUI_PATH="$$host" STYLEKIT_VENV="$$venv" "$$venv/bin/pytest" $(HOST_LAYERS) $(PYTEST_ARGS)

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
