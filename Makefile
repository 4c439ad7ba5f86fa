# `make study` and `make test` each create .venv and install the project first (once; a no-op after).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The torch build to install when the venv has none. Override for your platform/CUDA, e.g.
#   make study TORCH="torch torchvision --index-url https://download.pytorch.org/whl/cu124"
TORCH  ?= torch==2.14.1 torchvision==0.29.1
PARAMS ?= params/demo.yaml
RUNS   ?= runs

.PHONY: install study test browser lab clean-runs

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch, torchvision" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

# the main job: the whole demo study on embedded synthetic data, then the tables and the results
# notebook, the patch-token geometry of every encoder, and the offline HTML report
study: $(STAMP)
	$(BIN)/study run $(PARAMS) --runs $(RUNS)
	$(BIN)/study geometry $(PARAMS) --runs $(RUNS)
	$(BIN)/study report $(PARAMS) --runs $(RUNS)

# unit tests, then nbval over every notebook (lax: only cells marked NBVAL_CHECK_OUTPUT are compared)
test: $(STAMP) browser
	$(BIN)/python -m pytest tests
	$(BIN)/python -m pytest --nbval-lax --nbval-current-env --nbval-cell-timeout=600 -p no:cacheprovider notebooks

# the report and notebook browser tests drive headless Chromium; install Debian's package where we can (root + apt),
# otherwise those tests skip and say why (Playwright drives this system Chromium: no browser download)
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1; } || \
	  echo "chromium not installed: the browser tests will skip"

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks/

clean-runs:
	rm -rf $(RUNS)
