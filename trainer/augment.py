"""Training augmentations from the course, all from ``torchvision.transforms.v2``.

The default pipeline is built from :class:`AugmentConfig` in a known-good order. An explicit
``augment.pipeline`` (a list of ``[name, {kwargs}]``) is checked by a dry run on a probe image, and a
step that receives the wrong kind of input (PIL vs tensor) is reported by index and name.
"""

from __future__ import annotations

import math

import torch
from PIL import Image
from torchvision.transforms import v2

from facefuse.trainer.config import AugmentConfig
from facefuse.core.errors import FacefuseError

# name -> v2 transform class: the steps an explicit pipeline may use
TRANSFORMS = {
    "ToImage": v2.ToImage, "PILToTensor": v2.PILToTensor, "ToDtype": v2.ToDtype, "Normalize": v2.Normalize,
    "Resize": v2.Resize, "CenterCrop": v2.CenterCrop, "RandomResizedCrop": v2.RandomResizedCrop,
    "RandomCrop": v2.RandomCrop, "RandomHorizontalFlip": v2.RandomHorizontalFlip,
    "RandomVerticalFlip": v2.RandomVerticalFlip, "ColorJitter": v2.ColorJitter,
    "RandomPerspective": v2.RandomPerspective, "RandAugment": v2.RandAugment,
    "RandomErasing": v2.RandomErasing, "RandomGrayscale": v2.RandomGrayscale,
    "GaussianBlur": v2.GaussianBlur, "RandomRotation": v2.RandomRotation, "RandomAffine": v2.RandomAffine,
}
# steps that only make sense on a tensor image (v2 accepts PIL for most others)
TENSOR_ONLY = {"ToDtype", "Normalize", "RandomErasing"}


def default_pipeline(aug: AugmentConfig, image_size: int, mean, std) -> list:
    steps: list = [v2.PILToTensor()]
    if aug.crop_scale < 1.0:
        steps.append(v2.RandomResizedCrop(image_size, scale=(aug.crop_scale, 1.0), ratio=(0.9, 1.1), antialias=True))
    else:
        steps += [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]
    if aug.rotate > 0 or aug.translate > 0 or tuple(aug.zoom) != (1.0, 1.0):
        steps.append(v2.RandomAffine(degrees=aug.rotate, translate=(aug.translate, aug.translate) if aug.translate else None,
                                     scale=tuple(aug.zoom), interpolation=v2.InterpolationMode.BILINEAR))
    if aug.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(aug.hflip))
    if aug.vflip > 0:
        steps.append(v2.RandomVerticalFlip(aug.vflip))
    if aug.perspective > 0:
        steps.append(v2.RandomPerspective(distortion_scale=aug.perspective, p=0.5))
    if aug.color_jitter > 0:
        j = aug.color_jitter
        steps.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j, hue=min(0.5, j / 4)))
    if aug.randaugment > 0:
        steps.append(v2.RandAugment(num_ops=2, magnitude=aug.randaugment))
    if aug.grayscale > 0:
        steps.append(v2.RandomGrayscale(aug.grayscale))
    if aug.blur > 0:
        sigma = image_size / 64
        kernel = 2 * math.ceil(3 * 1.5 * sigma) + 1  # +-3 sigma of the widest blur
        steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.2 * sigma, 1.5 * sigma))], p=aug.blur))
    if aug.jpeg > 0:  # on uint8, after the geometric and colour steps
        steps.append(v2.RandomApply([v2.JPEG((20, 90))], p=aug.jpeg))
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if aug.shading > 0:
        steps.append(RandomShading(aug.shading))
    steps.append(v2.Normalize(list(mean), list(std)))
    if aug.random_erasing > 0:
        steps.append(v2.RandomErasing(p=aug.random_erasing, scale=(0.02, 0.2), value=0))
    return steps


def explicit_pipeline(spec: list) -> list:
    steps = []
    for i, item in enumerate(spec):
        name, kwargs = (item, {}) if isinstance(item, str) else (item[0], item[1] if len(item) > 1 else {})
        if name not in TRANSFORMS:
            raise FacefuseError(f"augment.pipeline[{i}]: unknown transform {name!r}; valid: {', '.join(TRANSFORMS)}")
        if name == "ToDtype":
            kwargs = {"dtype": torch.float32, "scale": True, **{k: v for k, v in kwargs.items() if k != "dtype"}}
        try:
            steps.append(TRANSFORMS[name](**kwargs))
        except (TypeError, ValueError) as exc:
            raise FacefuseError(f"augment.pipeline[{i}] ({name}): bad arguments {kwargs} ({exc})") from None
    return steps


def check_pipeline(steps: list, image_size: int) -> None:
    """Dry-run each step on a probe image; name the step whose input kind is wrong."""
    x = Image.new("RGB", (image_size + 7, image_size + 3), (120, 90, 60))
    for i, t in enumerate(steps):
        name = type(t).__name__
        if name in TENSOR_ONLY and isinstance(x, Image.Image):
            raise FacefuseError(f"augment.pipeline[{i}] ({name}) needs a tensor image but receives a PIL image: "
                                "put ToImage/PILToTensor (and ToDtype) before it")
        try:
            x = t(x)
        except (TypeError, ValueError, RuntimeError) as exc:
            kind = "PIL image" if isinstance(x, Image.Image) else f"tensor {getattr(x, 'dtype', type(x))}"
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise FacefuseError(f"augment.pipeline[{i}] ({name}) fails on its input ({kind}): {msg}") from None
    if not (isinstance(x, torch.Tensor) and x.is_floating_point() and tuple(x.shape) == (3, image_size, image_size)):
        got = type(x).__name__ if not isinstance(x, torch.Tensor) else f"{x.dtype} tensor {tuple(x.shape)}"
        raise FacefuseError(f"augment.pipeline must end in a float 3x{image_size}x{image_size} tensor, got {got}: "
                            "end it with a crop/resize, ToDtype and Normalize")


def build_train_transform(aug: AugmentConfig, image_size: int, mean, std) -> v2.Compose:
    steps = explicit_pipeline(aug.pipeline) if aug.pipeline else default_pipeline(aug, image_size, mean, std)
    check_pipeline(steps, image_size)
    return v2.Compose(steps)


class RandomShading(torch.nn.Module):
    """Directional lighting on a float image in [0, 1]: multiply by a linear ramp ``1 - s * t`` where
    ``t`` runs from 0 to 1 across the image along a random direction and ``s`` is uniform in
    ``[0, strength]`` (one side keeps its brightness, the opposite side is darkened by ``s``)."""

    def __init__(self, strength: float):
        super().__init__()
        self.strength = strength

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        angle = torch.rand(()) * 2 * math.pi
        ys = torch.linspace(-1, 1, h).view(h, 1)
        xs = torch.linspace(-1, 1, w).view(1, w)
        proj = xs * torch.cos(angle) + ys * torch.sin(angle)
        t = (proj - proj.min()) / (proj.max() - proj.min()).clamp_min(1e-6)
        gain = 1 - torch.rand(()) * self.strength * t
        return (img * gain.to(img.dtype)).clamp_(0, 1)


class BatchMixer:
    """MixUp / CutMix on a batch (v2.MixUp, v2.CutMix; one chosen at random when both are on).

    Margin losses need hard labels, so the soft labels v2 returns are turned back into
    ``(labels_a, labels_b, lam)``: v2 mixes each sample with the batch rolled by one, so
    ``soft == lam * onehot(a) + (1 - lam) * onehot(roll(a, 1))``, checked on every call."""

    def __init__(self, aug: AugmentConfig, num_classes: int):
        ops = []
        if aug.mixup > 0:
            ops.append(v2.MixUp(alpha=aug.mixup, num_classes=num_classes))
        if aug.cutmix > 0:
            ops.append(v2.CutMix(alpha=aug.cutmix, num_classes=num_classes))
        self.op = None if not ops else ops[0] if len(ops) == 1 else v2.RandomChoice(ops)

    @property
    def enabled(self) -> bool:
        return self.op is not None

    def __call__(self, x: torch.Tensor, labels: torch.Tensor):
        x_mixed, soft = self.op(x, labels)
        labels_b = labels.roll(1, 0)
        differs = labels != labels_b
        lam = float(soft[differs.nonzero()[0, 0], labels[differs][0]]) if differs.any() else 1.0
        n = soft.shape[1]
        expected = lam * torch.nn.functional.one_hot(labels, n) + (1 - lam) * torch.nn.functional.one_hot(labels_b, n)
        if not torch.allclose(soft, expected.to(soft.dtype), atol=1e-5):
            raise RuntimeError("MixUp/CutMix soft labels are not a two-label mixture; torchvision changed")
        return x_mixed, labels, labels_b, lam
