"""Shared core of Apparate-style early-exit serving.

Both sides of the system import from here: the Triton backend (``triton_backend``) and the controller
(``controller``). Each wire format has exactly one owner module, with a schema version:

- ``manifest``: the artifact manifest of a ramp-augmented model (blocks, candidate ramps, profile).
- ``exit_config``: the versioned exit configuration (active ramps and their thresholds) kept in Redis.
- ``feedback``: the per-batch feedback record streamed to Redis.
"""
