"""A CIFAR-style ResNet (He et al. 2016, §4.2) that takes raw uint8 HWC images.

Normalisation lives inside the model so that the served model's input is exactly what a client has (pixels), and so
that the exported graph carries it: nothing about preprocessing can drift between training and serving.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

LOGGER = logging.getLogger(__name__)

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet with three stages of ``blocks_per_stage`` basic blocks (ResNet-20 for 3, widths 16/32/64)."""

    def __init__(self, blocks_per_stage: int = 3, widths: tuple[int, int, int] = (16, 32, 64), classes: int = 10):
        super().__init__()
        self.register_buffer("mean", torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(CIFAR_STD).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers: list[nn.Module] = []
        in_channels = widths[0]
        for stage, width in enumerate(widths):
            for index in range(blocks_per_stage):
                layers.append(BasicBlock(in_channels, width, 2 if stage > 0 and index == 0 else 1))
                in_channels = width
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(in_channels, classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = (image.permute(0, 3, 1, 2).float() - self.mean) / self.std
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop (pad 4) and horizontal flip on uint8 NHWC images."""
    n = batch.shape[0]
    padded = F.pad(batch.permute(0, 3, 1, 2), (4, 4, 4, 4)).permute(0, 2, 3, 1)
    dx, dy = torch.randint(0, 9, (2,), generator=generator).tolist()
    out = padded[:, dy : dy + 32, dx : dx + 32, :]
    flip = torch.rand(n, generator=generator) < 0.5
    return torch.where(flip.view(n, 1, 1, 1), out.flip(2), out)


def train(
    images: np.ndarray,
    labels: np.ndarray,
    epochs: int,
    batch_size: int = 128,
    lr: float = 0.1,
    seed: int = 0,
    device: str = "cpu",
) -> CifarResNet:
    """Train with SGD + one-cycle schedule; deterministic for a given seed and device."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = CifarResNet().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = epochs * (len(labels) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    x_all, y_all = torch.from_numpy(images), torch.from_numpy(labels)
    from tqdm import tqdm

    progress = tqdm(total=steps, desc="train backbone", unit="step")
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(labels), generator=generator)
        correct = seen = 0
        for start in range(0, len(labels) - batch_size + 1, batch_size):
            index = order[start : start + batch_size]
            x = _augment(x_all[index], generator).to(device)
            y = y_all[index].to(device)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            progress.update(1)
            progress.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}", acc=f"{correct / seen:.3f}")
    progress.close()
    return model.eval().cpu()


@torch.no_grad()
def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray, batch_size: int = 500) -> float:
    model.eval()
    hits = 0
    for start in range(0, len(labels), batch_size):
        logits = model(torch.from_numpy(images[start : start + batch_size]))
        hits += int((logits.argmax(1).numpy() == labels[start : start + batch_size]).sum())
    return hits / len(labels)


def main(argv: list[str] | None = None) -> None:
    """Train the reference backbone on the last 90 % of the training split and save a safetensors checkpoint.

    The first 10 % is left unseen on purpose: ``prepare`` uses it as the bootstrap set for ramps, and a backbone that
    memorised those images would make ramp validation look better than serving will be.
    """
    from safetensors.torch import save_file

    from model_zoo.datasets import DEFAULT_CIFAR_DIR, cifar10_available, load_image_set

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--dataset", choices=("cifar10", "digits", "auto"), default="auto")
    parser.add_argument("--data-dir", type=Path, default=None, help="folder with train.tar.gz / test.tar.gz")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--out", type=Path, required=True, help="checkpoint path (.safetensors)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    dataset = args.dataset
    if dataset == "auto":
        dataset = "cifar10" if cifar10_available(args.data_dir or DEFAULT_CIFAR_DIR) else "digits"
    train_set = load_image_set(dataset, "train", args.data_dir)
    test_set = load_image_set(dataset, "test", args.data_dir)
    held_out = len(train_set) // 10
    started = time.monotonic()
    model = train(train_set.images[held_out:], train_set.labels[held_out:], args.epochs, device=args.device)
    LOGGER.info("trained in %.0f s; test accuracy %.4f", time.monotonic() - started,
                accuracy(model, test_set.images, test_set.labels))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.out))
    LOGGER.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
