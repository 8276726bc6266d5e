"""Reference models and data sets used by the demo, the tests and the benchmarks.

Apparate itself works on any trained model; this package only holds the small models we train here so that
everything runs without downloading weights.
"""
