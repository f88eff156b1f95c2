"""Benchmarks: training-step throughput and memory of MTA against its baseline (bench/train_step.py)."""
