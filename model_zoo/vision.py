"""ImageNet-family classifiers in plain PyTorch: ResNet-50, VGG-16 and a Vision Transformer.

They stand in for torchvision, which has no wheel matching the CPU build of torch the project pins. Module and
parameter names follow torchvision's layout, so a torchvision state dict (saved as safetensors) loads unchanged with
``--checkpoint``. Like the rest of the zoo, each model takes raw ``uint8`` ``[batch, height, width, 3]`` pixels and
normalises them itself (with non-persistent buffers, which keep the state dict torchvision's): the served input is what
a client has, and preprocessing cannot drift between training and serving.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PixelNormalization(nn.Module):
    """``uint8`` NHWC pixels to the float NCHW tensor torchvision models expect (ImageNet mean and std)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255.0, persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return (image.permute(0, 3, 1, 2).float() - self.mean) / self.std


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, as torchvision's "ResNet v1.5"), 1x1 expand; projection shortcut
    (``downsample``) when the shape changes."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.downsample(x))


class ResNet(nn.Module):
    """Bottleneck ResNet (He et al. 2016) with torchvision's stem, stage widths and head.

    Args:
        layers: bottleneck blocks per stage; ``(3, 4, 6, 3)`` is ResNet-50.
        num_classes: size of the classifier output.
    """

    def __init__(self, layers: tuple[int, int, int, int] = (3, 4, 6, 3), num_classes: int = 1000) -> None:
        super().__init__()
        self.normalize = PixelNormalization()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_channels = 64
        stages: list[nn.Sequential] = []
        for stage, blocks in enumerate(layers):
            width = 64 * 2**stage
            stride = 1 if stage == 0 else 2
            stage_blocks = []
            for index in range(blocks):
                stage_blocks.append(Bottleneck(in_channels, width, stride if index == 0 else 1))
                in_channels = width * Bottleneck.expansion
            stages.append(nn.Sequential(*stage_blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(self.normalize(image)))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


VGG16_LAYOUT: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                                       512, 512, 512, "M")


class VGG(nn.Module):
    """VGG (Simonyan and Zisserman 2015) in torchvision's layout: ``features``, ``avgpool``, ``classifier``.

    The classifier keeps torchvision's ``Dropout`` modules so its parameter indices (0, 3, 6) match torchvision's.

    Args:
        num_classes: size of the classifier output.
        batch_norm: a ``BatchNorm2d`` after every convolution (torchvision's ``vgg16_bn``).
        pool_size: side of the adaptive average pool before the classifier (torchvision: 7); 1 keeps the classifier
            small for low-resolution inputs, where 7x7 would only replicate a 1x1 feature map 49 times.
        classifier_width: width of the two hidden fully connected layers (torchvision: 4096).
        dropout: dropout probability of the classifier in training.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        batch_norm: bool = False,
        pool_size: int = 7,
        classifier_width: int = 4096,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.normalize = PixelNormalization()
        self.features = self._features(VGG16_LAYOUT, batch_norm)
        self.avgpool = nn.AdaptiveAvgPool2d(pool_size)
        self.classifier = nn.Sequential(
            nn.Linear(512 * pool_size * pool_size, classifier_width),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(classifier_width, classifier_width),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(classifier_width, num_classes),
        )

    @staticmethod
    def _features(layout: tuple[int | str, ...], batch_norm: bool) -> nn.Sequential:
        layers: list[nn.Module] = []
        in_channels = 3
        for item in layout:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            assert isinstance(item, int)
            layers.append(nn.Conv2d(in_channels, item, 3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(item))
            layers.append(nn.ReLU())
            in_channels = item
        return nn.Sequential(*layers)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(self.normalize(image)))
        return self.classifier(torch.flatten(x, 1))


class SelfAttention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameter names (``in_proj_weight``,
    ``in_proj_bias``, ``out_proj``), written out so that eager execution, ``torch.export`` and the ONNX exporter all
    run the same operators (``nn.MultiheadAttention`` switches to a fused kernel in eager inference only)."""

    def __init__(self, hidden_dim: int, num_heads: int) -> None:
        super().__init__()
        if hidden_dim % num_heads:
            raise ValueError(f"hidden_dim {hidden_dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = hidden_dim // num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * hidden_dim, hidden_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * hidden_dim))
        self.out_proj = nn.Linear(hidden_dim, hidden_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, hidden = x.shape
        heads = F.linear(x, self.in_proj_weight, self.in_proj_bias).reshape(batch, tokens, 3, self.num_heads, -1)
        query, key, value = heads.permute(2, 0, 3, 1, 4).unbind(0)
        scores = query @ key.transpose(-2, -1) / math.sqrt(self.head_dim)
        mixed = torch.softmax(scores, dim=-1) @ value
        return self.out_proj(mixed.transpose(1, 2).reshape(batch, tokens, hidden))


class EncoderLayer(nn.Module):
    """Pre-norm transformer layer: ``x + attention(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, hidden_dim: int, num_heads: int, mlp_dim: int, dropout: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.self_attention = SelfAttention(hidden_dim, num_heads)
        self.dropout = nn.Dropout(dropout)
        self.ln_2 = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, hidden_dim),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.self_attention(self.ln_1(x)))
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    """Learned position embedding, ``num_layers`` encoder layers (``encoder_layer_<i>``) and a final norm."""

    def __init__(self, seq_length: int, num_layers: int, num_heads: int, hidden_dim: int, mlp_dim: int,
                 dropout: float) -> None:
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_length, hidden_dim).normal_(std=0.02))
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.Sequential()
        for index in range(num_layers):
            self.layers.add_module(f"encoder_layer_{index}", EncoderLayer(hidden_dim, num_heads, mlp_dim, dropout))
        self.ln = nn.LayerNorm(hidden_dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(self.layers(self.dropout(x + self.pos_embedding)))


class VisionTransformer(nn.Module):
    """ViT (Dosovitskiy et al. 2021) in torchvision's layout: non-overlapping patch embedding (``conv_proj``), a
    class token, a pre-norm encoder and a linear head on the class token.

    Args:
        image_size: side of the square input image; a multiple of ``patch_size``.
        patch_size: side of a patch.
        num_layers: encoder layers.
        num_heads: attention heads per layer.
        hidden_dim: token width.
        mlp_dim: hidden width of each layer's MLP.
        num_classes: size of the classifier output.
        dropout: dropout probability in training.
    """

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        num_layers: int = 12,
        num_heads: int = 12,
        hidden_dim: int = 768,
        mlp_dim: int = 3072,
        num_classes: int = 1000,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.normalize = PixelNormalization()
        self.conv_proj = nn.Conv2d(3, hidden_dim, patch_size, patch_size)
        self.class_token = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        patches = (image_size // patch_size) ** 2
        self.encoder = Encoder(patches + 1, num_layers, num_heads, hidden_dim, mlp_dim, dropout)
        self.heads = nn.Sequential()
        self.heads.add_module("head", nn.Linear(hidden_dim, num_classes))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        patches = self.conv_proj(self.normalize(image)).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.class_token.expand(patches.shape[0], -1, -1), patches], dim=1)
        return self.heads(self.encoder(tokens)[:, 0])


def resnet50() -> ResNet:
    """ResNet-50 for ImageNet (25.6 M parameters): ``--model model_zoo.vision:resnet50``."""
    return ResNet((3, 4, 6, 3))


def vgg16() -> VGG:
    """VGG-16 for ImageNet (138 M parameters): ``--model model_zoo.vision:vgg16``."""
    return VGG()


def vgg16_bn() -> VGG:
    """VGG-16 with batch normalisation: ``--model model_zoo.vision:vgg16_bn``."""
    return VGG(batch_norm=True)


def vit_b_16() -> VisionTransformer:
    """ViT-B/16 for 224x224 ImageNet images (86 M parameters): ``--model model_zoo.vision:vit_b_16``."""
    return VisionTransformer()
