# Two entry points, each doing all the set-up on a fresh machine:
#   make test   create .venv, install, lint, run the whole test suite
#   make demo   create .venv, install, run the pipeline on the packaged sample input into ./data
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
# Nothing may fetch model weights from a hub at test or demo time.
export HF_HUB_OFFLINE := 1

.PHONY: install test lint docs demo clean postgres chromium

install: $(INSTALLED)

# torch and torchvision first, pinned: open_clip_torch would otherwise pull whatever torch is newest.
# TORCH_INDEX picks the index they come from, e.g. PyTorch's CPU-only wheels, without CUDA's libraries:
#   make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
$(INSTALLED): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) \
	  torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# byte-compiled now, as pip compiles a wheel's modules (the deploy image's): an editable install is
	# not, and where PYTHONDONTWRITEBYTECODE is set (CI's machines, many containers) every start of
	# laion-assets, of a test's subprocess and of the download workers' server would compile the
	# package's modules again: 0.3-0.4 s of each `laion-assets run` (docs/benchmarks.md)
	$(BIN)/python -m compileall -q laion_assets
	# inference-sdk (a test extra) pulls in opencv-python, whose cv2/ overwrites the files of the
	# opencv-python-headless we declare (same folder, another version, a Qt GUI build): keep the one
	# the deploy image has, so the tests and benches run the OpenCV users get
	$(BIN)/python -m pip uninstall --quiet --yes opencv-python
	$(BIN)/python -m pip install --quiet --force-reinstall --no-deps \
	  "opencv-python-headless==$$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("opencv-python-headless"))')"
	touch $@

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The manual (docs/, mkdocs.yml): a broken link, a missing page or snippet fails the build.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict  # not --quiet: it hides the warnings --strict counts

# The suite in TEST_WORKERS processes (pytest-xdist); --dist loadfile keeps a file's tests, and so its
# module fixtures, in one of them. Many tests wait on servers and subprocesses, so two workers keep two
# cores busy (figures: docs/getting-started.md). `make test TEST_WORKERS=0` runs it in one process.
TEST_WORKERS ?= 2
test: lint docs postgres chromium
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile

# The deployment test starts a real PostgreSQL server from the machine's binaries (initdb, pg_ctl).
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; } || \
	  { echo "make test needs PostgreSQL's initdb and pg_ctl: install your system's postgresql package" >&2; \
	    exit 1; }

# The search page test drives a real browser through Playwright: Debian's chromium, as Playwright's own
# browser download needs the internet.
chromium:
	@command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ] || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  { echo "make test needs a chromium browser for the search page test: install your system's" \
	    "chromium package (Debian: apt-get install chromium)" >&2; exit 1; }

demo: install
	$(BIN)/laion-assets demo

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
