"""A stratified, seeded split that keeps every duplicate group inside one split."""

from __future__ import annotations

import random
from collections import Counter

SPLITS = ("train", "val", "test")
MIN_IMAGES_TO_SPLIT = 3  # a class needs one image each for train, val and test


def split_groups(labels: list[int], components: list[list[int]], val: float, test: float,
                 seed: int) -> dict[str, list[int]]:
    """Stratified, seeded split that never separates the members of a component.

    Each component counts for the class most of its images have; per class, components are shuffled
    and dealt to test, then val, while they fit in that split's share of the class, the rest to
    train. A group larger than what is left of a share goes to train rather than overfilling it (a
    class made of one big group of near-duplicates would otherwise land wholly in test). Every class
    of three or more images gets at least one in val and in test (when their fractions are above
    zero); smaller classes stay whole in train.
    """
    rng = random.Random(seed)
    by_class: dict[int, list[list[int]]] = {}
    for component in sorted(components, key=min):
        label = Counter(labels[i] for i in component).most_common(1)[0][0]
        by_class.setdefault(label, []).append(component)
    split: dict[str, list[int]] = {name: [] for name in SPLITS}
    for label in sorted(by_class):
        groups = by_class[label]
        rng.shuffle(groups)
        total = sum(len(g) for g in groups)
        wanted = {"test": _share(test, total), "val": _share(val, total)}
        taken = {"test": 0, "val": 0}
        for group in groups:
            target = next((name for name in ("test", "val") if taken[name] + len(group) <= wanted[name]),
                          "train")
            if target != "train":
                taken[target] += len(group)
            split[target].extend(group)
    return {name: sorted(indices) for name, indices in split.items()}


def _share(fraction: float, total: int) -> int:
    """Images of a class of `total` that a split with `fraction` gets."""
    if fraction == 0 or total < MIN_IMAGES_TO_SPLIT:
        return 0
    return max(1, round(fraction * total))


def split_notes(classes: list[str], labels: list[int], split: dict[str, list[int]],
                fractions: dict[str, float]) -> list[str]:
    """What the split did that a user would not expect: classes absent from val or test, and why."""
    notes = []
    for label, name in enumerate(classes):
        count = sum(1 for value in labels if value == label)
        missing = [part for part in ("val", "test") if fractions[part] > 0
                   and not any(labels[i] == label for i in split[part])]
        if not missing:
            continue
        if count < MIN_IMAGES_TO_SPLIT:
            why = f"has only {count} image{'s' if count > 1 else ''}: all in train"
        else:
            why = (f"has {count} images in duplicate groups too large for its val/test share: "
                   "kept in train")
        notes.append(f"class {name!r} {why}, none in {' or '.join(missing)}, so its "
                     f"{' and '.join(missing)} scores are missing")
    return notes


