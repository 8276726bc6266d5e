"""Loading prepared artifacts: exact outputs, and clear failures for corrupt or mismatched files."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from early_exit.errors import ArtifactError
from early_exit.runtime import EarlyExitModel
from model_zoo.cifar_resnet import CifarResNet
from tests.conftest import MODEL


@pytest.fixture()
def entry(repository: Path, tmp_path: Path) -> Path:
    copy = tmp_path / MODEL
    shutil.copytree(repository / MODEL, copy)
    return copy / "1"


def test_final_output_equals_the_original_model(repository: Path, checkpoint: Path) -> None:
    original = CifarResNet().eval()
    original.load_state_dict(load_file(str(checkpoint)))
    images = torch.randint(0, 256, (9, 32, 32, 3), dtype=torch.uint8)
    served = EarlyExitModel(repository / MODEL / "1")
    with torch.inference_mode():
        verdicts = list(served.stages({"IMAGE": images}, list(range(len(served.manifest.ramps)))))
        expected = torch.softmax(original(images), dim=1)
    assert len(verdicts) == len(served.manifest.ramps) + 1
    torch.testing.assert_close(verdicts[-1].probs, expected, rtol=0, atol=1e-6)


def test_corrupt_block_fails_the_load_naming_the_file(entry: Path) -> None:
    block = entry / "block_3.pt2"
    block.write_bytes(block.read_bytes()[:-100] + b"x" * 100)
    with pytest.raises(ArtifactError, match="block_3.pt2.*corrupt or mismatched"):
        EarlyExitModel(entry)


def test_missing_artifact_and_bad_manifest_fail_clearly(entry: Path) -> None:
    (entry / "ramps.safetensors").unlink()
    with pytest.raises(ArtifactError, match="ramps.safetensors.*missing"):
        EarlyExitModel(entry)
    manifest = json.loads((entry / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (entry / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="schema_version"):
        EarlyExitModel(entry)


def test_a_block_that_is_not_an_exported_program_is_refused(entry: Path) -> None:
    from early_exit.manifest import sha256_of

    block = entry / "block_0.pt2"
    block.write_bytes(b"PK\x03\x04 definitely not a torch.export archive")
    manifest = json.loads((entry / "manifest.json").read_text())
    manifest["blocks"][0]["sha256"] = sha256_of(block)  # a consistent but bogus artifact
    (entry / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="cannot load exported block"):
        EarlyExitModel(entry)


def test_every_ramp_set_runs_fused_segments_with_exact_outputs(repository: Path) -> None:
    """Fusing the blocks between active ramps changes nothing: the same final output as the vanilla entry and the
    same ramp verdicts whatever else is active."""
    served = EarlyExitModel(repository / MODEL / "1")
    vanilla = EarlyExitModel(repository / f"{MODEL}_vanilla" / "1")
    images = torch.randint(0, 256, (5, 32, 32, 3), dtype=torch.uint8)
    every = list(range(len(served.manifest.ramps)))
    with torch.inference_mode():
        reference = list(served.stages({"IMAGE": images}, every))
        expected = list(vanilla.stages({"IMAGE": images}, []))[-1].probs
        for active in ([], [0], [2, 5], every[-1:]):
            verdicts = list(served.stages({"IMAGE": images}, active))
            assert len(served.plan(active)) == len(active) + 1
            assert torch.equal(verdicts[-1].probs, expected)
            for verdict in verdicts[:-1]:
                assert torch.equal(verdict.probs, reference[verdict.exit].probs)


def test_a_pass_stopped_at_a_ramp_finishes_block_by_block_with_the_same_verdicts(repository: Path) -> None:
    """``finish`` continues from the activations ``stages`` left behind: one step per remaining block, the later
    ramps' verdicts and the final verdict exactly as an uninterrupted pass computes them."""
    served = EarlyExitModel(repository / MODEL / "1")
    images = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    active = [1, 4, 6]
    with torch.inference_mode():
        whole = list(served.stages({"IMAGE": images}, active))
        values: dict[str, torch.Tensor] = {}
        head = served.stages({"IMAGE": images}, active, values)
        assert next(head).exit == 1
        steps = list(served.finish(values, 1, active))
    remaining = len(served.manifest.blocks) - 1 - served.manifest.ramps[1].after_block
    assert len(steps) == remaining + 1
    verdicts = [step for step in steps if step is not None]
    assert [v.exit for v in verdicts] == [4, 6, served.manifest.final_exit]
    for verdict, expected in zip(verdicts, whole[1:]):
        torch.testing.assert_close(verdict.probs, expected.probs, rtol=0, atol=1e-6)
