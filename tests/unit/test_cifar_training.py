"""Reference-backbone training resumes where it stopped and ends exactly where an uninterrupted run ends."""

from pathlib import Path

import torch

from model_zoo.cifar_resnet import TrainSettings, train
from model_zoo.datasets import load_digits


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path: Path) -> None:
    data = load_digits("train")
    images, labels = data.images[:512], data.labels[:512]
    settings = TrainSettings(depth=8, epochs=2, batch_size=128, seed=3)
    straight = train(images, labels, settings)
    state = tmp_path / "run.state.pt"
    train(images, labels, settings, state_path=state, stop_after=1)  # the job is cut off after one epoch
    assert torch.load(state, weights_only=True)["epoch"] == 1
    resumed = train(images, labels, settings, state_path=state)
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
