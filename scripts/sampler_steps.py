"""Thin entry point: this benchmark lives in flowmo.bench.sampler_steps (`python -m flowmo.bench.sampler_steps`)."""

from flowmo.bench.sampler_steps import main

if __name__ == "__main__":
    raise SystemExit(main())
