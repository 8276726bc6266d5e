"""Fixtures shared by all tests: the reference model prepared once per session into a temporary repository."""

from __future__ import annotations

from pathlib import Path

import pytest

from model_zoo.datasets import DEFAULT_CIFAR_DIR, cifar10_available

ROOT = Path(__file__).resolve().parents[1]
MODEL = "cifar10_resnet" if cifar10_available(DEFAULT_CIFAR_DIR) else "digits_resnet"
DATASET = MODEL.split("_")[0]


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The committed reference checkpoint; for the digits fallback, a quickly trained one."""
    committed = ROOT / "models" / f"{MODEL}.safetensors"
    if committed.is_file():
        return committed
    from model_zoo.cifar_resnet import main as train

    out = tmp_path_factory.mktemp("checkpoint") / f"{MODEL}.safetensors"
    train(["--dataset", DATASET, "--epochs", "3", "--out", str(out)])
    return out


@pytest.fixture(scope="session")
def repository(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> Path:
    """``<MODEL>``, ``<MODEL>_vanilla`` and the raw-image front (``<MODEL>_preprocess``, ``<MODEL>_pipeline``)
    prepared from a reduced bootstrap set (keeps the suite fast). The early-exit entry serves no control batches
    (``control_share`` 0), so a test that sets thresholds knows where every sample is answered; the test of control
    batches turns them on."""
    from controller.prepare.__main__ import main as prepare

    repo = tmp_path_factory.mktemp("model_repository")
    code = prepare(["--name", MODEL, "--checkpoint", str(checkpoint), "--data", DATASET, "--repository", str(repo),
                    "--limit", "2000", "--max-batch-size", "32"])
    assert code == 0
    without_control_batches(repo / MODEL)
    return repo


def without_control_batches(entry: Path) -> None:
    """Serve the prepared early-exit ``entry`` with ``control_share`` 0: no traced batch runs the fused graph, so a
    test that sets thresholds knows where every sample is answered."""
    with (entry / "config.pbtxt").open("a", encoding="utf-8") as config:
        config.write('parameters: { key: "control_share" value: { string_value: "0" } }\n')
