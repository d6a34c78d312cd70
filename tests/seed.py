"""Where bench/api_latency.py finds the rows it reads; the builders live in tests/factories.py."""

from factories import review_batches, sampler_png, seed_rows

__all__ = ["review_batches", "sampler_png", "seed_rows"]
