"""Architectures of the reference models: diffusers transformers plus a class-prompt table.

Both reference models are stock diffusers classes so that dit-opt is tested on the code paths it
meets in practice; only their sizes are small. The configurations below are the ones the shipped
weights were trained with; the JSON next to each weights file records them again, and loading
uses the JSON.

* ``digits-dit`` - :class:`diffusers.DiTTransformer2DModel`, adaLN-Zero, DiT-XL/2 layout scaled
  down: 8 blocks, 4 heads x 32 = 128 wide, patch 2 on 1x16x16 images (64 tokens).
  ``num_embeds_ada_norm=10`` follows DiT-XL/2 (``1000`` there): diffusers then allocates one extra
  embedding row, index 10, which is the null class used for classifier-free guidance.
* ``digits-mmdit`` - :class:`diffusers.FluxTransformer2DModel`, 2 double-stream and 4
  single-stream blocks, 4 heads x 32; the 1x16x16 image is packed 2x2 into 64 tokens of 4
  channels as FLUX packs latents. The "prompt" is :class:`ClassPrompt`: 4 learned tokens per
  class plus a learned pooled vector, with class 10 as the null prompt for guidance.
* ``crops-pixart`` - :class:`diffusers.PixArtTransformer2DModel` (adaLN-single, self-attention,
  cross-attention to the prompt, MLP), 12 blocks, 4 heads x 64 = 256 wide, patch 2 on 3x32x32
  RGB crops (256 tokens). The prompt is a :class:`ClassPrompt` of 4 learned tokens of 64
  channels per class (no pooled vector; PixArt has none), which the model's caption projection
  maps to its width; class 8 is the null prompt.
"""

from __future__ import annotations

import torch
from diffusers import DiTTransformer2DModel, FluxTransformer2DModel, PixArtTransformer2DModel
from torch import nn

__all__ = [
    "NUM_CLASSES",
    "NULL_CLASS",
    "IMAGE_SIZE",
    "DIT_CONFIG",
    "MMDIT_CONFIG",
    "PROMPT_CONFIG",
    "PIXART_CONFIG",
    "PIXART_PROMPT_CONFIG",
    "ClassPrompt",
    "build_transformer",
    "pack_images",
    "unpack_tokens",
    "image_ids",
]

NUM_CLASSES = 10
#: Label of the unconditional ("null") class for classifier-free guidance, in both models.
NULL_CLASS = 10
IMAGE_SIZE = 16

DIT_CONFIG: dict = {
    "num_attention_heads": 4,
    "attention_head_dim": 32,
    "in_channels": 1,
    "out_channels": 1,
    "num_layers": 8,
    "sample_size": IMAGE_SIZE,
    "patch_size": 2,
    "num_embeds_ada_norm": NUM_CLASSES,
    "norm_type": "ada_norm_zero",
}

MMDIT_CONFIG: dict = {
    "patch_size": 1,
    "in_channels": 4,
    "num_layers": 2,
    "num_single_layers": 4,
    "attention_head_dim": 32,
    "num_attention_heads": 4,
    "joint_attention_dim": 64,
    "pooled_projection_dim": 64,
    "guidance_embeds": False,
    # Rotary axes (unused, row, column); their sum must equal attention_head_dim.
    "axes_dims_rope": [8, 12, 12],
}

PROMPT_CONFIG: dict = {"num_classes": NUM_CLASSES + 1, "tokens_per_class": 4, "token_dim": 64, "pooled_dim": 64}

PIXART_CONFIG: dict = {
    "num_attention_heads": 4,
    "attention_head_dim": 64,
    "in_channels": 3,
    "out_channels": 3,
    "num_layers": 12,
    "cross_attention_dim": 256,
    "caption_channels": 64,
    "sample_size": 32,
    "patch_size": 2,
    "norm_type": "ada_norm_single",
    "num_embeds_ada_norm": 1000,
    "activation_fn": "gelu-approximate",
    "use_additional_conditions": False,
}
#: 8 crop classes (``dit_opt.zoo.crops.CLASSES``) plus the null prompt, class 8.
PIXART_PROMPT_CONFIG: dict = {"num_classes": 9, "tokens_per_class": 4, "token_dim": 64, "pooled_dim": None}


class ClassPrompt(nn.Module):
    """Learned stand-in for a text encoder: a class label becomes a short prompt.

    Args:
        num_classes: Rows of the tables, the null class included (11).
        tokens_per_class: Prompt length in tokens.
        token_dim: Token width, the transformer's ``joint_attention_dim``.
        pooled_dim: Width of the pooled embedding, the transformer's ``pooled_projection_dim``;
            ``None`` for models that take no pooled prompt (PixArt).

    Example:
        >>> prompt = ClassPrompt(11, 4, 64, 64)
        >>> tokens, pooled = prompt(torch.tensor([3, 10]))
        >>> tokens.shape, pooled.shape
        (torch.Size([2, 4, 64]), torch.Size([2, 64]))
    """

    def __init__(self, num_classes: int, tokens_per_class: int, token_dim: int, pooled_dim: int | None) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.tokens_per_class = tokens_per_class
        self.tokens = nn.Embedding(num_classes * tokens_per_class, token_dim)
        nn.init.normal_(self.tokens.weight, std=0.5)
        self.pooled = None
        if pooled_dim is not None:
            self.pooled = nn.Embedding(num_classes, pooled_dim)
            nn.init.normal_(self.pooled.weight, std=0.5)

    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompt tokens and pooled embedding of each label.

        Args:
            labels: int64 ``(N,)`` in ``0..num_classes-1``.

        Returns:
            ``(encoder_hidden_states (N, tokens_per_class, token_dim), pooled (N, pooled_dim))``;
            ``pooled`` is ``None`` without a pooled table.
        """
        offsets = torch.arange(self.tokens_per_class, device=labels.device)
        idx = labels[:, None] * self.tokens_per_class + offsets[None, :]
        return self.tokens(idx), (self.pooled(labels) if self.pooled is not None else None)


def build_transformer(kind: str, config: dict) -> nn.Module:
    """A randomly initialised transformer of the given kind and configuration.

    Args:
        kind: ``"dit"`` (:class:`DiTTransformer2DModel`), ``"mmdit"`` (:class:`FluxTransformer2DModel`)
            or ``"pixart"`` (:class:`PixArtTransformer2DModel`).
        config: Constructor arguments, e.g. :data:`DIT_CONFIG` or :data:`MMDIT_CONFIG`.

    Returns:
        The model.

    Raises:
        ValueError: Unknown kind.
    """
    if kind == "dit":
        return DiTTransformer2DModel(**config)
    if kind == "mmdit":
        cfg = dict(config)
        cfg["axes_dims_rope"] = tuple(cfg["axes_dims_rope"])
        return FluxTransformer2DModel(**cfg)
    if kind == "pixart":
        return PixArtTransformer2DModel(**config)
    raise ValueError(f"unknown transformer kind {kind!r}; use 'dit', 'mmdit' or 'pixart'.")


def pack_images(images: torch.Tensor) -> torch.Tensor:
    """Pack ``(N, C, H, W)`` into FLUX tokens ``(N, H/2 * W/2, 4C)`` (2x2 patches, row-major).

    Args:
        images: ``(N, C, H, W)`` with even ``H`` and ``W``.

    Returns:
        The token sequence, channel-major within a patch as ``FluxPipeline._pack_latents``.
    """
    n, c, h, w = images.shape
    x = images.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, (h // 2) * (w // 2), c * 4)


def unpack_tokens(tokens: torch.Tensor, height: int = IMAGE_SIZE, width: int = IMAGE_SIZE) -> torch.Tensor:
    """Inverse of :func:`pack_images`.

    Args:
        tokens: ``(N, H/2 * W/2, 4C)``.
        height: Image height ``H``.
        width: Image width ``W``.

    Returns:
        Images ``(N, C, H, W)``.
    """
    n, _, d = tokens.shape
    c = d // 4
    x = tokens.view(n, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(n, c, height, width)


def image_ids(height: int = IMAGE_SIZE, width: int = IMAGE_SIZE) -> torch.Tensor:
    """FLUX position ids of the packed image tokens: ``(H/2 * W/2, 3)`` rows ``[0, row, col]``.

    Args:
        height: Image height ``H``.
        width: Image width ``W``.

    Returns:
        float32 ids, 2-D as current diffusers expects.
    """
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3)
