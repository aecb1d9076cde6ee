# make demo: set up .venv and run the main job on the virtual microscope.
# make test: set up .venv and run the test suite.   make bench: print speed figures.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.install-stamp

.PHONY: install test demo bench chromium clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Browser tests drive Debian's chromium; Playwright never downloads a browser here.
chromium:
	@test -x /usr/bin/chromium || { \
	  sudo=""; [ "$$(id -u)" -eq 0 ] || sudo="sudo -n"; \
	  ($$sudo apt-get update -qq && \
	   $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "chromium could not be installed: browser tests will be skipped"; }

test: $(STAMP) chromium
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/marrowcount demo

bench: $(STAMP)
	$(PY) -m tests.bench

clean:
	rm -rf $(VENV) var build *.egg-info
