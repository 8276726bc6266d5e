"""Offline preparation (paper §3.1): cut points, candidate ramps, ramp training, profiling, export."""
