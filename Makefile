# sshjobs: `make demo` and `make test` set everything up on a fresh Debian machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LAB_DIR ?= .lab
LAB_HOSTS ?= 10

.PHONY: venv system-deps lint test bench bench-transfer demo lab-up lab-down clean docker-base docker-up docker-demo docker-down

# openssh-server for the local lab, chromium for the timeline page's browser test (root on
# Debian; otherwise say what is missing: without chromium that test is skipped, except in CI)
system-deps:
	@if [ ! -x /usr/sbin/sshd ] || ! command -v chromium >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server openssh-client python3-venv chromium >/dev/null; \
	  elif [ ! -x /usr/sbin/sshd ]; then echo "install openssh-server (sudo apt-get install openssh-server chromium)"; exit 1; \
	  else echo "note: chromium is missing (sudo apt-get install chromium): the timeline's browser test will be skipped"; fi; \
	fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat  # a path .pth: no import hook at every start
	touch $@

venv: $(VENV)/.installed

lint: venv
	$(VENV)/bin/ruff check sshjobs tests bench examples

test: system-deps venv docker-base lint
	$(PY) -m pytest -q

# The benchmarks (bench/README.md): a 100-host lab on 127.0.$${SSHJOBS_LAB_SUBNET:-9}.x, ~5 min.
bench: system-deps venv
	$(PY) -m bench $(BENCH_ARGS)

# Files over SFTP (bench/transfer.py): a 10-host lab on 127.0.$${SSHJOBS_LAB_SUBNET:-6}.x, ~1 min.
bench-transfer: system-deps venv
	$(PY) -m bench.transfer $(BENCH_ARGS)

# The seed demo: a 10-host lab (stopped afterwards), numpy installed on every host, 10 jobs.
# DEMO_ARGS="--keep-lab" leaves the lab running; DEMO_ARGS="-i hosts.toml" uses your hosts.
demo: system-deps venv
	$(PY) examples/demo.py --hosts $(LAB_HOSTS) --dir $(LAB_DIR) $(DEMO_ARGS)

lab-up: system-deps venv
	$(VENV)/bin/sshjobs lab up --hosts $(LAB_HOSTS) --dir $(LAB_DIR) --out inventory/lab.toml

lab-down:
	$(VENV)/bin/sshjobs lab down --dir $(LAB_DIR)

# -- The 10-container cluster (docker/): compose project "sshjobs", network 172.31.66.0/24 --
DOCKER_OK = docker info >/dev/null 2>&1

# The node base image: the registry's debian:bookworm-slim, else debootstrap; cached by tag.
# Without an engine it says so and goes on (the Docker tests are then skipped).
docker-base:
	@if $(DOCKER_OK); then ./docker/build-base.sh; \
	else echo "docker-base: no Docker engine answers (docker info): Docker tests will be skipped"; fi

docker-up: venv
	@$(DOCKER_OK) || { echo "no Docker engine answers (docker info)"; exit 1; }
	$(PY) -m sshjobs.dockerlab up --dir .docker --out inventory/docker.toml

# The seed demo on the containers; it says whether numpy came online or as shipped wheels.
docker-demo: docker-up
	$(PY) examples/demo.py -i inventory/docker.toml

# Removes only this project's containers, network and images (sshjobs/node, sshjobs/base).
docker-down:
	@if [ -x $(PY) ]; then $(PY) -m sshjobs.dockerlab down --images; \
	else docker-compose -f docker/compose.yml -p sshjobs down -v --remove-orphans; \
	  docker image rm sshjobs/node:latest sshjobs/base:bookworm 2>/dev/null || true; fi

clean: lab-down
	rm -rf $(VENV) $(LAB_DIR) *.egg-info
