"""Clients and process orchestration: the demo, the benchmark, and the local serving stack they drive."""
