"""Evaluation: sampler error against exact or high-accuracy reference solutions."""

from .sampler_bench import BenchRecord, bench_samplers, steps_for_nfe

__all__ = ["BenchRecord", "bench_samplers", "steps_for_nfe"]
