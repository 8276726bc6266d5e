"""Triton entry point: tokenise raw text (see triton_backend.preprocess_text)."""

from triton_backend.preprocess_text import TritonPythonModel  # noqa: F401
