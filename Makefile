# The two set-up commands in README.md: `make run` and `make test`. Both install
# everything they need first (scripts/setup.sh), on Debian/Ubuntu or macOS.

VENV  := .venv
BIN   := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	./scripts/setup.sh
	touch $(STAMP)

run: install
	$(BIN)/metapeft run jobs/quickstart.yaml

# Two test processes (the machines have two cores), each test file in one of them (its
# module fixtures, a Ray cluster among them, built once).
test: install
	$(BIN)/ruff check metapeft_dist tests bench
	$(BIN)/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --durations=15 tests

bench: install
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) runs .bench
