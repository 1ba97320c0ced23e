"""sdc-bench: benchmarks and rate-distortion comparisons (the bench extra; not part of the runtime)."""
