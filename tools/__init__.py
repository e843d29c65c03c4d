"""Tools on top of the library: the demo, local infrastructure and benchmarks."""
