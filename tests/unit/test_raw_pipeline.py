"""The raw-input front ``prepare`` writes: which entries get one, and that its steps chain into the entry."""

from __future__ import annotations

import re
from pathlib import Path

from controller.prepare.raw_pipeline import servable_image, write_image_pipeline
from early_exit.manifest import TensorSpec

ROOT = Path(__file__).resolve().parents[2]


def test_only_a_single_uint8_rgb_image_input_gets_an_image_front() -> None:
    image = TensorSpec("IMAGE", "uint8", (224, 224, 3))
    assert servable_image((image,)) == image
    assert servable_image((TensorSpec("IMAGE", "float32", (224, 224, 3)),)) is None
    assert servable_image((TensorSpec("IMAGE", "uint8", (3, 224, 224)),)) is None
    assert servable_image((image, TensorSpec("MASK", "uint8", (224, 224, 3)))) is None
    assert servable_image((TensorSpec("INPUT_IDS", "int64", (64,)),)) is None


def test_image_front_resizes_to_the_entry_input_and_chains_into_it(tmp_path: Path) -> None:
    entries = write_image_pipeline(tmp_path, "mine", TensorSpec("IMAGE", "uint8", (96, 64, 3)), 7, 16)
    assert entries == ("mine_preprocess", "mine_pipeline")
    preprocess = (tmp_path / "mine_preprocess" / "config.pbtxt").read_text()
    assert 'name: "IMAGE" data_type: TYPE_UINT8 dims: [ 96, 64, 3 ]' in preprocess  # the size it decodes to
    assert "triton_backend.preprocess_image" in (tmp_path / "mine_preprocess" / "1" / "model.py").read_text()
    pipeline = (tmp_path / "mine_pipeline" / "config.pbtxt").read_text()
    assert re.findall(r'model_name: "([^"]+)"', pipeline) == ["mine_preprocess", "mine"]
    assert 'name: "PROBS" data_type: TYPE_FP32 dims: [ 7 ]' in pipeline
    assert "max_batch_size: 16" in pipeline and "max_batch_size: 16" in preprocess


def test_committed_reference_front_is_what_prepare_writes(tmp_path: Path) -> None:
    """``make prepare`` rewrites the committed CIFAR front in place: it must come out byte-identical."""
    write_image_pipeline(tmp_path, "cifar10_resnet", TensorSpec("IMAGE", "uint8", (32, 32, 3)), 10, 32)
    for entry in ("cifar10_resnet_preprocess", "cifar10_resnet_pipeline"):
        for written in (tmp_path / entry).rglob("*"):
            if written.is_file():
                committed = ROOT / "model_repository" / written.relative_to(tmp_path)
                assert committed.read_bytes() == written.read_bytes(), committed
