"""Thin entry point: the model benchmark lives in flowmo.bench.model (`make bench`, `python -m flowmo.bench.model`)."""

from flowmo.bench.model import main

if __name__ == "__main__":
    raise SystemExit(main())
