"""Triton entry point (written by prepare): see triton_backend.preprocess_image."""

from triton_backend.preprocess_image import TritonPythonModel  # noqa: F401
