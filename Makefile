# make demo: set up .venv and run the main job (bundled SmolLM2, built-in demo edits)
# make test: set up .venv and run the whole test suite (real bundled models included: what CI runs)
# make test-fast: the tiny random model only, no test marked slow (a few minutes on 2 CPU cores)
.PHONY: setup demo test test-fast
setup:
	bash scripts/setup.sh
demo: setup
	.venv/bin/recipe demo
test: setup
	.venv/bin/python -m pytest -q
test-fast: setup
	.venv/bin/python -m pytest -q -m "not slow"
