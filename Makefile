# rkllm.fleet: `make lab` builds and provisions the Docker lab fleet; `make test` runs every check.
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg
# Lab endpoints on the machine running the lab (override: make lab LAB_GATEWAY_PORT=8080)
LAB_GATEWAY_PORT ?= 18080
LAB_PROMETHEUS_PORT ?= 19090
LAB_UPSTREAM_PORT ?= 18000
export LAB_GATEWAY_PORT LAB_PROMETHEUS_PORT LAB_UPSTREAM_PORT
# The Molecule scenarios' fleet (make molecule, make test) has containers (rkllm-mol-*), a network
# (rkllm-mol) and host ports of its own, so a running lab is left alone (docs/testing.md).
MOL_GATEWAY_PORT ?= 28080
MOL_PROMETHEUS_PORT ?= 29090
MOL_UPSTREAM_PORT ?= 28000
export MOL_GATEWAY_PORT MOL_PROMETHEUS_PORT MOL_UPSTREAM_PORT
# The lab inventory (a directory with hosts.yml and group_vars): six boards instead of three
# with `make lab LAB_INVENTORY=lab/inventories/six-boards` (docs/performance.md).
LAB_INVENTORY ?= inventories/lab
# Molecule scenarios `make molecule` (and so `make test`) runs, in order; pick some with
# `make molecule SCENARIOS=faults`.
SCENARIOS ?= default upgrade faults

.PHONY: help venv lab lab-images lab-up lab-status lab-down test test-extra lint sanity tarball-test unit acceptance wheels molecule lab-pins clean docs matrix ee

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(VENV)/.stamp: requirements.txt requirements-dev.txt
	@echo "==> Creating $(VENV) with the pinned controller and test tools"
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -m pip install -q -r requirements-dev.txt
	@mkdir -p .cache/collections/ansible_collections/rkllm
	@ln -sfn ../../../.. .cache/collections/ansible_collections/rkllm/fleet
	@touch $@

venv: $(VENV)/.stamp ## create .venv with the pinned tools

lab: venv ## build and provision the lab fleet (Docker), then print its endpoints
	@$(PY) lab/lab.py up --inventory $(LAB_INVENTORY)/hosts.yml
	@echo "==> Provisioning the lab fleet: ansible-playbook playbooks/site.yml -i $(LAB_INVENTORY)"
	@$(BIN)/ansible-playbook playbooks/site.yml -i $(LAB_INVENTORY)
	@$(PY) lab/lab.py status --inventory $(LAB_INVENTORY)/hosts.yml

lab-images: venv ## build (or reuse) the lab images only
	@$(PY) lab/lab.py images

lab-up: venv ## start the lab containers without provisioning them
	@$(PY) lab/lab.py up --inventory $(LAB_INVENTORY)/hosts.yml

lab-status: venv ## print the lab endpoints and one line per board
	@$(PY) lab/lab.py status --inventory $(LAB_INVENTORY)/hosts.yml

lab-down: ## remove every container, network, image, volume and state file the lab, Molecule, make matrix and make ee made
	@python3 lab/lab.py down

lab-pins: venv ## regenerate inventories/lab/group_vars/all/lab_pins.yml from the lab sources
	@$(PY) lab/upstream/build.py --out lab/.state/upstream-root --pins inventories/lab/group_vars/all/lab_pins.yml

test: lint docs sanity tarball-test unit wheels molecule ## run every check: lint, docs, sanity, the tarball, unit tests, wheels, Molecule scenarios (with the acceptance suite)

# The ansible-core matrix (2.20 in a Debian 13 container) and the execution environment build each
# install from PyPI into images of their own: with the lab built from scratch they would take
# `make test` past CI's time budget, so they have their own target (run it before a release).
test-extra: matrix ee ## the ansible-core matrix and the execution environment (not in make test: CI time)

lint: venv ## yamllint and ansible-lint (production profile)
	@echo "==> yamllint"
	@$(BIN)/yamllint -s .
	@echo "==> ansible-lint (production profile)"
	@$(BIN)/ansible-lint --offline --profile production

docs: venv ## antsibull-docs lint-collection-docs, then the HTML site (reference, README, docs/, role READMEs) in build/docs/html
	@$(PY) .ci/docs.py

sanity: venv ## ansible-test sanity on the collection tarball, installed
	@$(PY) .ci/sanity.py

tarball-test: venv ## build the tarball, check what it holds, install it, run its unit tests and its playbooks as a user
	@$(PY) .ci/tarball_test.py

matrix: venv ## sanity, unit tests and the playbooks on every other ansible-core version requires_ansible admits (MATRIX_ARGS=--all for .venv's too)
	@$(PY) .ci/matrix.py $(MATRIX_ARGS)

ee: venv ## build the execution environment rkllm-fleet/ee (ansible-builder, local base image) and syntax-check the playbooks in it
	@$(PY) .ci/ee.py

unit: venv ## pytest: modules, module_utils, filters, lab stand-ins and lab upstream
	@echo "==> pytest"
	@$(BIN)/pytest

acceptance: venv ## the fleet's contract (tests/acceptance) against an inventory: make acceptance INVENTORY=inventories/mine
	@$(BIN)/pytest tests/acceptance --ansible-inventory=$(or $(INVENTORY),$(LAB_INVENTORY)) -p no:cacheprovider -rfEs $(PYTEST_ARGS)

wheels: venv ## every shipped pip constraints file resolves to wheels for linux aarch64/x86_64 on each Python its header allows (PyPI)
	@echo "==> wheels (tools/constraints.py check)"
	@$(PY) tools/constraints.py check

molecule: venv ## Molecule scenarios on the lab images in containers, network and ports of their own ($(SCENARIOS)); a running lab is left alone
	@$(PY) lab/lab.py images
	@set -e; for s in $(SCENARIOS); do echo "==> molecule test -s $$s"; $(BIN)/molecule test -s $$s; done

clean: lab-down ## lab-down, then remove .venv and caches
	rm -rf $(VENV) .cache .pytest_cache
