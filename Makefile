# envctl — two commands do all set-up on a fresh machine: `make run` and `make test`.
# The venv is built from Debian's python3 (not a pyenv build under /root) so that processes
# running as other uids — test users, the build user — can execute it.
PYTHON ?= /usr/bin/python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# gcc + python3-dev build the healer's C extension (envctl_shared/heal/_fastfs.c) at install time.
# Tests and benchmarks also build our FUSE latency filesystem (bench/latencyfs/) with gcc and
# libfuse3-dev (+ pkg-config), and mount it with fuse3.
BUILD_PACKAGES := python3-venv python3-dev gcc
# The web tests (tests/test_web_*.py) sign in through a real JupyterHub in headless Chromium.
APT_PACKAGES := $(BUILD_PACKAGES) bindfs fuse3 libfuse3-dev inotify-tools strace libsystemd-dev pkg-config systemd-container tini chromium chromium-driver
PYTEST_ARGS ?=

.PHONY: run demo-config test check deps venv apt bench clean install screenshots

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# ENVCTL_REQUIRE_EXTENSION=1: the C extension is optional for client-only installs (see setup.py);
# here it must build, or the healer cannot run. The install is editable, so only what pip
# reads (the project's metadata) and what it compiles (the C extension) make it run again:
# `make check` then `make test` (CI) install once, not twice (~12 s each).
INSTALLED := $(VENV)/.installed
venv: $(INSTALLED)
$(INSTALLED): $(BIN)/python pyproject.toml setup.py daemon/envctl_shared/heal/_fastfs.c
	ENVCTL_REQUIRE_EXTENSION=1 $(BIN)/pip install -q -e '.[daemon,web,test]'
	# systemd-python is optional (journald logging, sd_notify via libsystemd): best effort.
	$(BIN)/pip install -q -e '.[systemd]' || echo "systemd-python unavailable: falling back to the built-in notify/stderr logging"
	touch $@

apt:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "missing Debian packages:$$missing (run as root or install them)"; exit 1; fi; \
	fi

deps: apt venv

# Run the daemon in the foreground on the embedded demo config: root, socket, state under ./var/.
# demo-config renders config/dev.yaml into $(DEMO)/ (its ./ paths are relative to the rendered
# file); the daemon creates its state dir itself (its own mode). Not root: the demo root is
# shared with your primary group and builds run as you. As root: with the demo group
# $(DEMO_GROUP), whose member the demo account $(DEMO_USER) writes into it in the quick start
# (both created here), and builds run as $SUDO_USER, else as $(DEMO_USER): a root daemon never
# builds as root, and no demo file is root's group's. config/quickstart.sh is what to try next
# (the README's quick start is the same text, which names the demo account).
DEMO ?= var
DEMO_USER := envctl-demo
DEMO_GROUP := envctl-demo
# The web UI next to the demo daemon: `envctl web --local` (no hub: loopback only, as you, to
# whoever has the URL with the secret it prints; docs/web.md).
WEB_PORT ?= 8765
run:
	@$(MAKE) --no-print-directory apt APT_PACKAGES="$(BUILD_PACKAGES)"
	@$(MAKE) --no-print-directory venv
	@$(MAKE) --no-print-directory demo-config
	@cat config/quickstart.sh
	@$(BIN)/envctl --socket "$(abspath $(DEMO))/run/envctld.sock" web --local --port $(WEB_PORT) & \
	  web=$$!; trap 'kill $$web 2>/dev/null' EXIT INT TERM; \
	  $(BIN)/envctld --config $(DEMO)/dev.yaml

demo-config:
	@mkdir -p $(DEMO)/envs $(DEMO)/run
	@if [ "$$(id -u)" != 0 ]; then u=$$(id -un); g=$$(id -gn); who=$$u; \
	else g=$(DEMO_GROUP); who="$(DEMO_USER)"; \
	  getent group $$g >/dev/null || groupadd --system $$g || exit 1; \
	  id -u $(DEMO_USER) >/dev/null 2>&1 || useradd --system --no-create-home \
	    --shell /usr/sbin/nologin --gid $$g $(DEMO_USER) || exit 1; \
	  if ! id -nG $(DEMO_USER) | tr ' ' '\n' | grep -qx $$g; then \
	    echo "make: the demo account $(DEMO_USER) is not in group $$g:" \
	      "'usermod -aG $$g $(DEMO_USER)'"; exit 1; fi; \
	  if [ -n "$$SUDO_USER" ] && [ "$$SUDO_USER" != root ]; then u=$$SUDO_USER; \
	  else u=$(DEMO_USER); fi; who="$$who $$u"; \
	  for a in $$who; do \
	    if ! setpriv --reuid=$$a --regid=$$(id -g $$a) --clear-groups \
	        test -x "$(abspath $(DEMO))"; then \
	      echo "make: $$a (builds, or writes in the demo) cannot reach $(abspath $(DEMO)):" \
	        "use a checkout others can traverse (not under /root)"; exit 1; fi; done; fi; \
	sed -e "s/@GROUP@/$$g/g" -e "s/@BUILD_USER@/$$u/" config/dev.yaml > $(DEMO)/dev.yaml

# Two passes (tests/conftest.py's docstring says why): the suite on $(TEST_WORKERS) pytest-xdist
# workers, each test file on one worker, files marked slow first (more workers than cores pay:
# tests wait on builds, daemons and the disk); then the tests marked serial, alone. Both run whatever happens; exit
# status 5 of one pass (PYTEST_ARGS selected none of its tests) is no failure.
TEST_WORKERS ?= 3
PARALLEL_PASS := $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder \
	--serial-tests=exclude
SERIAL_PASS := $(BIN)/python -m pytest --serial-tests=only
test: deps
	@echo "$(PARALLEL_PASS) $(PYTEST_ARGS)"; $(PARALLEL_PASS) $(PYTEST_ARGS); p=$$?; \
	echo "$(SERIAL_PASS) $(PYTEST_ARGS)"; $(SERIAL_PASS) $(PYTEST_ARGS); s=$$?; \
	if [ $$p = 5 ] && [ $$s = 5 ]; then exit 5; fi; \
	[ $$p = 0 -o $$p = 5 ] && [ $$s = 0 -o $$s = 5 ]

# The README's pictures of the web pages: the browser test, its screenshots kept in docs/img.
screenshots: deps
	ENVCTL_SCREENSHOTS=$(CURDIR)/docs/img $(BIN)/python -m pytest tests/test_web_ui.py -k story

# Lint and types (CI runs it before the tests): ruff's rule set and mypy's strictness are in
# pyproject.toml.
check: deps
	$(BIN)/ruff check daemon tests bench
	$(BIN)/mypy daemon/envctl_shared

# Full benchmarks (tables under bench/results/); each takes minutes. `--quick` runs are in the tests.
bench: deps
	$(BIN)/python bench/bench_heal.py
	$(BIN)/python bench/bench_daemon.py
	$(BIN)/python bench/bench_api.py
	$(BIN)/python bench/bench_builds.py
	$(BIN)/python bench/bench_freeze.py

# Install system-wide (root): venv /opt/envctl from $(PYTHON), units, sysusers/tmpfiles, config
# if absent, daemon-reload. Does not start anything; see docs/systemd.md.
install:
	@$(MAKE) --no-print-directory apt APT_PACKAGES="$(BUILD_PACKAGES)"
	PYTHON=$(PYTHON) sh scripts/install.sh

clean:
	rm -rf var .pytest_cache build daemon/envctl_shared/heal/*.so $(INSTALLED)
