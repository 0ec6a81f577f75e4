"""Thin entry point: this benchmark lives in flowmo.bench.data (`python -m flowmo.bench.data`)."""

from flowmo.bench.data import main

if __name__ == "__main__":
    raise SystemExit(main())
