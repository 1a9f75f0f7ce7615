"""From a loader's (index, a, b) to the model contract's ``Batch``: views on the device, in the
parameters' dtype under fp64, augmented where the config says so, and second augmented views
when the objective needs them (and the model does not provide its own).

Each side's augmentation (``plait.data.AUGMENTATIONS``, by modality) has its own seeded
generator (seed + 0 for a, seed + 1 for b, plus ``RANK_SEED_STRIDE`` x rank under torchrun), so
its draws never touch the global random state and a checkpoint restores them.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf

from plait._checks import is_number

RANK_SEED_STRIDE = 10_007  # under torchrun rank r's random draws (augmentation, dropout) start from seed + r * this
SIDES = ("a", "b")


def build_augmentation(config: DictConfig, dataset, side: str, needed: bool, rank: int, device: torch.device):
    """The augmentation of one side's modality, if its training view is augmented
    (``data.augment.<modality>``) or ``needed`` (the objective's second views); else None. Its
    options (``data.augment.<modality>_options``) are checked against the augmentation's own
    signature: a ValueError names the key."""
    from plait.data import AUGMENTATIONS

    modality = dataset.modalities[SIDES.index(side)]
    augment = config.data.augment
    if not (augment[modality] or needed):
        return None
    key = f"data.augment.{modality}_options"
    options = OmegaConf.to_container(augment[f"{modality}_options"], resolve=True) or {}
    options.setdefault("seed", config.seed + SIDES.index(side) + RANK_SEED_STRIDE * rank)
    name = modality if modality in AUGMENTATIONS else "vector"
    accepted = AUGMENTATIONS.accepted(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"{key} has no option {', '.join(map(repr, unknown))}; the {modality} augmentation's options: "
                         f"{', '.join(accepted)}")
    scale = options.get("crop_scale")
    if scale is not None and not (isinstance(scale, (list, tuple)) and len(scale) == 2 and all(is_number(x) for x in scale)):
        raise ValueError(f"{key}.crop_scale={scale!r} is not valid: it must be [min, max] with 0 < min <= max <= 1")
    if scale is not None:
        options["crop_scale"] = tuple(scale)
    try:
        if modality == "image":
            return AUGMENTATIONS.build(name, fill={"image_size": dataset.image_size}, **options).to(device)
        return AUGMENTATIONS.build(name, **options)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{key}: {str(error).splitlines()[0] if str(error) else type(error).__name__}") from None


class BatchPreparer:
    """Turns a loader's (index, a, b) into views on the device: ``prepare`` returns (index, a, b,
    a_aug, b_aug), the training views (augmented where configured) and the second augmented
    views (None when the objective needs none or the model provides them)."""

    def __init__(self, config: DictConfig, dataset, device: torch.device, param_dtype: torch.dtype | None,
                 second_views: bool, rank: int):
        self.dataset, self.device, self.param_dtype, self.second_views = dataset, device, param_dtype, second_views
        # every side's augmentation, built when augmented or when second views are needed
        self.augment = {side: build_augmentation(config, dataset, side, second_views, rank, device) for side in SIDES}
        # per-step settings as plain Python values: an OmegaConf lookup costs ~10 us, a step of a small model ~1 ms
        self._augment_views = tuple(bool(config.data.augment[m]) for m in dataset.modalities)

    def _augmented(self, side: str, x, index):
        if self.dataset.modalities[SIDES.index(side)] == "text":
            alternatives = [self.dataset.alternatives[i] for i in index.tolist()] if self.dataset.alternatives else None
            return self.augment[side](list(x), alternatives)
        return self.augment[side](x)

    def to_device(self, x):
        """A view on the device (floating tensors in the parameters' dtype under fp64); texts as a list."""
        if not torch.is_tensor(x):
            return list(x)
        if self.param_dtype is not None and x.is_floating_point():
            return x.to(self.device, self.param_dtype, non_blocking=True)
        return x.to(self.device, non_blocking=True)

    def prepare(self, index, a, b, provides_augmented: bool = False):
        """(index, a, b, a_aug, b_aug) on the device; ``provides_augmented``: the model makes its
        own second views (no augmented views are drawn for it)."""
        a = self.to_device(a)
        b = self.to_device(b)
        a_aug = b_aug = None
        if self.second_views and not provides_augmented:
            a_aug, b_aug = self._augmented("a", a, index), self._augmented("b", b, index)
        if self._augment_views[0]:
            a = self._augmented("a", a, index)
        if self._augment_views[1]:
            b = self._augmented("b", b, index)
        return index.to(self.device), a, b, a_aug, b_aug

    def state_dict(self) -> dict:
        """Each built augmentation's random state, by side."""
        return {side: module.get_state() for side, module in self.augment.items() if module is not None}

    def load_state_dict(self, states: dict) -> None:
        """Restore each built augmentation's random state (checked by ``plait.training.state``)."""
        for side, module in self.augment.items():
            if module is not None and side in states:
                module.set_state(states[side])
