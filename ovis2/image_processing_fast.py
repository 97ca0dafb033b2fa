"""Ovis2ImageProcessorFast: the same crop plans as Ovis2ImageProcessor, executed with torch.

Resizing uses torch's antialiased bicubic interpolation, which on CPU runs a vectorised uint8 kernel built
to follow PIL's filter (results differ from PIL by a grey level or two at most); on CUDA it runs in float32
and is rounded back to uint8. On CPU the normalisation is the PIL processor's table lookup (numpy,
single-threaded: torch's threaded element-wise ops lose to it on a busy 2-core machine); on CUDA it is one
multiply-add per crop. Grids are identical to the
PIL processor's because both execute the same `CropPlan`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .image_processing import CropPlan, Ovis2ImageProcessor, paste_normalized


class Ovis2ImageProcessorFast(Ovis2ImageProcessor):
    """Torch backend (CPU threads or CUDA); `__call__` as Ovis2ImageProcessor's, tensors on `device`."""

    backend = "torch"

    def __init__(self, *args, device: str | torch.device = "cpu", **kwargs):
        super().__init__(*args, **kwargs)
        self.device = torch.device(device)
        mean = torch.tensor(self.image_mean, dtype=torch.float32)
        std = torch.tensor(self.image_std, dtype=torch.float32)
        self._scale = (1 / (255 * std)).view(3, 1, 1).to(self.device)  # (x/255 - mean)/std == x*scale + bias
        self._bias = (-mean / std).view(3, 1, 1).to(self.device)

    def image_tensor(self, image) -> torch.Tensor:
        """Any accepted input -> uint8 [1, 3, H, W] (channels-last memory) on the device."""
        rgb = np.asarray(self.prepare_image(image))  # [H, W, 3] uint8
        pixels = torch.from_numpy(rgb.copy() if not rgb.flags.writeable else rgb)
        return pixels.to(self.device, non_blocking=True).permute(2, 0, 1).unsqueeze(0)

    def preprocess_image(self, image, max_patches: int | None = None, min_patches: int | None = None):
        pixels = self.image_tensor(image)
        height, width = pixels.shape[-2:]
        plan = self.crop_plan(width, height, max_patches, min_patches)
        return self._run_plan(pixels, plan), plan.grid

    def _run_plan(self, pixels: torch.Tensor, plan: CropPlan) -> torch.Tensor:
        canvas = resize_uint8(pixels, plan.canvas) if plan.canvas else None
        resized = [
            resize_uint8(_region(canvas if crop.on_canvas else pixels, crop.box), crop.size)[0]
            for crop in plan.crops
        ]
        if self.device.type == "cpu":
            return torch.from_numpy(self._normalize_on_cpu(resized, plan))
        return self._normalize_on_device(resized, plan)

    def _normalize_on_cpu(self, resized: list[torch.Tensor], plan: CropPlan) -> np.ndarray:
        # numpy's single-threaded table lookup beats torch's threaded element-wise ops on small CPUs
        out = np.empty((len(plan.crops), 3, self.side, self.side), dtype=np.float32)
        for index, (crop, pixels) in enumerate(zip(plan.crops, resized, strict=True)):
            hwc = pixels.permute(1, 2, 0).numpy()  # a strided view, no copy
            paste_normalized(out[index], self._table, hwc, crop.offset)
        return out

    def _normalize_on_device(self, resized: list[torch.Tensor], plan: CropPlan) -> torch.Tensor:
        out = torch.zeros((len(plan.crops), 3, self.side, self.side), dtype=torch.float32, device=self.device)
        for index, (crop, pixels) in enumerate(zip(plan.crops, resized, strict=True)):
            (x, y), (width, height) = crop.offset, crop.size
            out[index, :, y : y + height, x : x + width] = pixels.float().mul_(self._scale).add_(self._bias)
        return out


def _channels_last(pixels: torch.Tensor) -> torch.Tensor:
    """The channels-last layout torch's vectorised uint8 kernel needs (copied by numpy, single-threaded)."""
    if pixels.is_contiguous(memory_format=torch.channels_last):
        return pixels
    nhwc = np.ascontiguousarray(pixels.permute(0, 2, 3, 1).numpy())
    return torch.from_numpy(nhwc).permute(0, 3, 1, 2)


def _region(pixels: torch.Tensor, box) -> torch.Tensor:
    left, upper, right, lower = box
    return pixels[:, :, upper:lower, left:right]


def resize_uint8(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [n, 3, H, W] -> uint8 [n, 3, height, width], antialiased bicubic like PIL's; size is (w, h)."""
    width, height = size
    if tuple(pixels.shape[-2:]) == (height, width):
        return pixels
    if pixels.device.type == "cpu":
        return F.interpolate(_channels_last(pixels), size=(height, width), mode="bicubic", antialias=True)
    resized = F.interpolate(
        pixels.float(), size=(height, width), mode="bicubic", antialias=True, align_corners=False
    )
    return resized.round_().clamp_(0, 255).to(torch.uint8)
