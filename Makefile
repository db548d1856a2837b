VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install netlab-tools test lint format bench demo clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e '.[model,test]'
	touch $(STAMP)

install: $(STAMP)

# The network-namespace lab (tests/netlab) needs root, iproute2 and iptables; without
# them those tests skip and say why.
netlab-tools:
	@if [ "$$(id -u)" = 0 ] && ! command -v iptables >/dev/null; then \
		apt-get update -qq && apt-get install -y -qq iptables >/dev/null || \
		echo "iptables could not be installed: the netns tests will skip"; fi

test: $(STAMP) netlab-tools
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

demo: $(STAMP)
	$(PY) -m swarm demo

bench: $(STAMP)
	for b in transport dht placement generate spotcheck; do $(PY) benchmarks/$$b.py --quick || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
