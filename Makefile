# The two commands of the README. Both create or reuse .venv/ (see install.sh).
.PHONY: demo test install
install:
	@./install.sh
demo: install          ## the main job, on the embedded default store
	.venv/bin/wrag demo
test: install          ## the whole test suite, slow end-to-end tests included
	.venv/bin/python -m pytest tests -q
