# sshjobs: `make demo` and `make test` set everything up on a fresh Debian machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LAB_DIR ?= .lab
LAB_HOSTS ?= 10

.PHONY: venv system-deps test bench demo lab-up lab-down clean

# openssh-server for the local lab (root on Debian; otherwise say what is missing)
system-deps:
	@if [ ! -x /usr/sbin/sshd ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server openssh-client python3-venv >/dev/null; \
	  else echo "install openssh-server (sudo apt-get install openssh-server)"; exit 1; fi; \
	fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

test: system-deps venv
	$(PY) -m pytest -q

# The benchmarks (bench/README.md): a 100-host lab on 127.0.$${SSHJOBS_LAB_SUBNET:-9}.x, ~5 min.
bench: system-deps venv
	$(PY) -m bench $(BENCH_ARGS)

# The seed demo: a 10-host lab (stopped afterwards), numpy installed on every host, 10 jobs.
# DEMO_ARGS="--keep-lab" leaves the lab running; DEMO_ARGS="-i hosts.toml" uses your hosts.
demo: system-deps venv
	$(PY) examples/demo.py --hosts $(LAB_HOSTS) --dir $(LAB_DIR) $(DEMO_ARGS)

lab-up: system-deps venv
	$(VENV)/bin/sshjobs lab up --hosts $(LAB_HOSTS) --dir $(LAB_DIR) --out inventory/lab.toml

lab-down:
	$(VENV)/bin/sshjobs lab down --dir $(LAB_DIR)

clean: lab-down
	rm -rf $(VENV) $(LAB_DIR) *.egg-info
