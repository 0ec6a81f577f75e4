"""Thin entry point: this benchmark lives in flowmo.bench.compare (`python -m flowmo.bench.compare`)."""

from flowmo.bench.compare import main

if __name__ == "__main__":
    raise SystemExit(main())
