"""Load generation and measurement helpers shared by `benchmarks/` and the tests."""
