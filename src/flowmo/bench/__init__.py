"""The benchmarks (figures only, never timed assertions): the model workloads built from the training code
itself (workloads.py), timing and memory (measure.py), the benchmark command (model.py).
"""
