"""The ``apparate`` Triton backend: a Python-based backend serving ramp-augmented models with early answers.

Triton loads ``<backend-dir>/apparate/model.py``, a thin file that re-exports ``TritonPythonModel`` from
``triton_backend.model`` (see ``make setup``); everything else lives in this package.
"""
