"""What an ``apparate_llm`` entry tells the controller: its manifest and its feedback records (triton_backend.llm_setup),
and the ``write`` command that builds entries."""

from __future__ import annotations

import numpy as np
import pytest

from early_exit.feedback import FeedbackRecord
from early_exit.llm_decoding import Observation
from early_exit.manifest import Manifest
from triton_backend.llm_setup import LLMSettings, TokenCosts, llm_feedback_record, llm_manifest, main


def test_manifest_round_trips_with_one_ramp_per_layer_but_the_last() -> None:
    manifest = Manifest.from_json(llm_manifest("m", 4, 97, {2: 0.9}, TokenCosts(1.5, 4.0, 0.25)).to_json())
    assert [r.id for r in manifest.ramps] == [0, 1, 2] and [r.after_block for r in manifest.ramps] == [0, 1, 2]
    assert manifest.final_exit == 3 and manifest.initial_thresholds == {1: 0.9} and manifest.exits_fixed
    blocks, ramps = manifest.profile.at(16)
    assert blocks.tolist() == [1.5, 1.5, 1.5, 5.5] and ramps.tolist() == [0.25] * 3  # the LM head ends the last
    assert TokenCosts.from_parameters(TokenCosts(1.5, 4.0, 0.25).parameters()) == TokenCosts(1.5, 4.0, 0.25)
    assert TokenCosts.from_parameters({"layer_ms": "1", "head_ms": "2"}) is None


def test_feedback_record_maps_layers_to_ramp_ids() -> None:
    exited = Observation((1, 2), 3, exit=1, confidence={1: 0.5, 2: 0.7}, prediction={1: 40000, 2: 41}, final=41)
    deep = Observation((1, 2), 3, exit=3, confidence={1: 0.1, 2: 0.2}, prediction={1: 7, 2: 8}, final=8)
    record = FeedbackRecord.decode({k.encode(): v if isinstance(v, bytes) else str(v).encode() for k, v in
                                    llm_feedback_record("m", [exited, deep], 3, [2.0, 4.0], "r").encode().items()})
    assert record.ramps == (0, 1) and record.config_version == 3 and record.replica == "r"
    np.testing.assert_array_equal(record.prediction, [[40000, 7], [41, 8]])
    np.testing.assert_allclose(record.confidence, [[0.5, 0.1], [0.7, 0.2]])
    assert record.final.tolist() == [41, 8] and record.exit.tolist() == [0, 2]  # 2 = final_exit of 3 layers
    assert record.timing.batch_ms == 3.0
    with pytest.raises(ValueError):
        llm_feedback_record("m", [exited, Observation((1,), 3)], 3, [1.0, 1.0], "r")


def test_write_command(tmp_path, capsys) -> None:
    assert main(["write", str(tmp_path), "lm", "--model", "tiny:1", "--exits", "2:0.9", "--param", "max_rows=4"]) == 0
    config = (tmp_path / "lm" / "config.pbtxt").read_text()
    assert 'backend: "apparate_llm"' in config and '"2:0.9"' in config and '"max_rows"' in config
    assert '"exits"' not in (tmp_path / "lm_vanilla" / "config.pbtxt").read_text()
    assert LLMSettings.from_parameters({"model": "tiny:1"}).feedback_sample == 0.25
    with pytest.raises(ValueError):
        main(["write", str(tmp_path), "bad", "--model", "tiny:1", "--param", "feedback_sample=2"])
