"""Triton entry point: decode encoded images (see triton_backend.preprocess_image)."""

from triton_backend.preprocess_image import TritonPythonModel  # noqa: F401
