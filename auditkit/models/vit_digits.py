"""The patch embedding of the built-in ViT ``vit-digits`` (architectures.py), in its own module so
that timm is imported only when the ViT is built, and so that the class pickles by name."""

from __future__ import annotations

from timm.layers import PatchEmbed
from torch import nn


class ConvStemPatchEmbed(PatchEmbed):
    """timm's ``PatchEmbed`` whose patch projection reads a 3x3 convolution's 16 channels (GELU): an
    early convolution (Xiao et al., NeurIPS 2021, "Early convolutions help transformers see better").
    Each token still stands for its patch, seeing one pixel around it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        projection = self.proj
        self.proj = nn.Sequential(nn.Conv2d(projection.in_channels, 16, 3, padding=1), nn.GELU(),
                                  nn.Conv2d(16, projection.out_channels, projection.kernel_size,
                                            stride=projection.stride))
