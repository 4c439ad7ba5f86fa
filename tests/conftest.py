"""Fixtures shared by several test files."""

from __future__ import annotations

import pytest
import torch

from studylib.core.model import build_encoder


@pytest.fixture(scope="module")
def tiny_encoder_images():
    """A seeded fresh viny-tiny encoder with 16 random uint8 images and random trimaps (the geometry tests)."""
    torch.manual_seed(0)
    enc = build_encoder("viny-tiny")
    images = torch.randint(0, 256, (16, 3, 64, 64), generator=torch.Generator().manual_seed(34), dtype=torch.uint8)
    masks = torch.randint(0, 3, (16, 64, 64), generator=torch.Generator().manual_seed(35))
    return enc, images, masks
