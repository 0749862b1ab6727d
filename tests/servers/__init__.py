"""Real HTTP servers that stand in for external services in tests and benchmarks."""
