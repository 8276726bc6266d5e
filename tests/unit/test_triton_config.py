"""config.pbtxt rendering: the JSON form Triton's model-control API takes, written as protobuf text."""

from __future__ import annotations

from controller.prepare.triton_config import render_config, render_pbtxt
from early_exit.manifest import TensorSpec
from early_exit.model_config import model_config, verdict_configs


def test_a_configuration_renders_as_protobuf_text() -> None:
    config = model_config("m", "apparate", 8, [TensorSpec("IMAGE", "uint8", (32, 32, 3))], verdict_configs(10),
                          250, 2, "KIND_GPU", {"source": 'say "hi"'}, preferred_batch_sizes=[4])
    text = render_pbtxt(config)
    assert 'name: "m"\nbackend: "apparate"\nmax_batch_size: 8\n' in text
    assert '{ name: "IMAGE" data_type: TYPE_UINT8 dims: [ 32, 32, 3 ] }' in text  # enums bare, strings quoted
    assert '{ name: "PROBS" data_type: TYPE_FP32 dims: [ 10 ] }' in text
    assert "dynamic_batching {\n  preferred_batch_size: [ 4 ]\n  max_queue_delay_microseconds: 250\n}\n" in text
    assert "instance_group [\n  { count: 2 kind: KIND_GPU }\n]\n" in text
    assert 'parameters: { key: "source" value: { string_value: "say \\"hi\\"" } }\n' in text


def test_an_entry_answers_every_verdict_tensor() -> None:
    text = render_config("m", [TensorSpec("x", "float32", (4,))], 3, 16)
    for name in ("PROBS", "LABEL", "EXIT", "CONFIDENCE"):
        assert f'name: "{name}"' in text
    assert "max_queue_delay_microseconds: 0" in text and "preferred_batch_size" not in text
