"""Thin entry point: this benchmark lives in flowmo.bench.generator (`python -m flowmo.bench.generator`)."""

from flowmo.bench.generator import main

if __name__ == "__main__":
    raise SystemExit(main())
