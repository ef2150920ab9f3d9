"""Training items on the model grid: the held-out split, padding and random patches.

An :class:`Item` is one preprocessed image with its label (a whole case, or the part of a case
on one side of a held-out block). :func:`split_items` holds out validation data honestly (whole
cases with three or more cases, else a contiguous block of every case that is never sampled for
training); :func:`pad_to` pads items smaller than the patch; :func:`index_foreground` lists
foreground voxels so that :func:`sample_batch` can centre a third of the patches on them. The
segmentation, box-detector and click trainers share these.

Arrays are ``image (C, *spatial)`` float32 and ``label (*spatial)`` int64 on the model grid
(R, A, S in 3D; rows, columns in 2D); patch sizes are in voxels in the same axis order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from napari_medseg.training.dataset import DatasetError

#: Share of patches centred on a foreground voxel (:func:`sample_batch`).
FOREGROUND_FRACTION = 1.0 / 3.0

__all__ = [
    "FOREGROUND_FRACTION",
    "Item",
    "index_foreground",
    "pad_to",
    "sample_batch",
    "split_items",
]


@dataclass
class Item:
    """One training or validation item on the model grid.

    Attributes
    ----------
    name : str
        The case name, with ``[a:b]`` for a block of it.
    image : (C, *spatial) float32 array
        Normalised image.
    label : (*spatial) int64 array
    fg : dict
        Class -> ``(N, ndim)`` voxel coordinates of that class (subsampled,
        :func:`index_foreground`).
    score : (axis, a, b), optional
        Validation only: only slices ``[a, b)`` along ``axis`` are scored (the rest is image
        context).
    """

    name: str
    image: np.ndarray
    label: np.ndarray
    fg: dict = field(default_factory=dict)
    score: tuple[int, int, int] | None = None

    def scored(self, arr: np.ndarray) -> np.ndarray:
        """The part of a ``(*spatial)`` array that is scored."""
        if self.score is None:
            return arr
        axis, a, b = self.score
        sl = [slice(None)] * arr.ndim
        sl[axis] = slice(a, b)
        return arr[tuple(sl)]


def _block_split(
    name: str,
    image: np.ndarray,
    label: np.ndarray,
    axis: int,
    frac: float,
    min_train: int,
    context: int = 0,
) -> tuple[list[Item], Item, tuple[int, int]]:
    """Hold out a contiguous block along ``axis``; train on the rest.

    The block holds at least half the foreground any block of its length could hold, and among
    such positions the one leaving the longest contiguous training piece is taken (so training
    patches are not mostly padding). The validation item carries up to ``context`` slices of
    image on each side so the network sees the block as it sees training patches; only the
    block's own voxels are scored, and no voxel of the block is ever in a training item.
    """
    n = label.shape[axis]
    length = int(min(max(1, round(frac * n)), n - 1))
    per_slice = np.count_nonzero(np.moveaxis(label, axis, 0).reshape(n, -1), axis=1)
    fg_in = np.array([per_slice[s : s + length].sum() for s in range(n - length + 1)])
    ok = np.nonzero(fg_in >= 0.5 * fg_in.max())[0]
    piece = np.maximum(ok, n - (ok + length))
    start = int(ok[int(np.argmax(piece))])
    stop = start + length
    sl = [slice(None)] * label.ndim

    def take(a: int, b: int, off: int = 0) -> tuple:
        s = list(sl)
        s[axis] = slice(a, b)
        return tuple([slice(None)] * off + s)

    c0, c1 = max(0, start - context), min(n, stop + context)
    val = Item(
        f"{name}[{start}:{stop}]",
        image[take(c0, c1, 1)],
        label[take(c0, c1)],
        score=(axis, start - c0, stop - c0),
    )
    train = []
    for a, b in ((0, start), (stop, n)):
        if b - a >= min_train:
            train.append(Item(f"{name}[{a}:{b}]", image[take(a, b, 1)], label[take(a, b)]))
    return train, val, (start, stop)


def split_items(
    names: list[str],
    data: list[tuple[np.ndarray, np.ndarray]],
    dims: int,
    val_fraction: float,
    seed: int,
    patch: list[int],
) -> tuple[list[Item], list[Item], dict]:
    """Split preprocessed cases into training and validation items.

    Three or more cases: whole cases are held out (at least one, ``val_fraction`` of them).
    Fewer: a contiguous block (``val_fraction`` of the slices along S for 3D, of the rows for
    2D) of each case, placed on the foreground centre, is held out.

    Parameters
    ----------
    names : list of str
        Case names.
    data : list of (image, label)
        ``image (C, *spatial)`` and ``label (*spatial)`` of each case on the model grid.
    dims : {2, 3}
    val_fraction : float
        0 holds out nothing.
    seed : int
        Chooses the held-out cases.
    patch : list of int
        Training patch (voxels): a block leaves training pieces of at least a quarter patch and
        carries half a patch of image context on each side.

    Returns
    -------
    train, val : lists of :class:`Item`
    info : dict
        ``held_out`` (text), ``train_cases``, ``val_cases`` and, for block splits, ``blocks``.
    """
    if val_fraction <= 0:
        items = [Item(n, im, lb) for n, (im, lb) in zip(names, data)]
        return (
            items,
            [],
            {"held_out": "nothing (no validation)", "train_cases": names, "val_cases": []},
        )
    if len(names) >= 3:
        rng = np.random.default_rng(seed)
        n_val = int(min(len(names) - 1, max(1, round(val_fraction * len(names)))))
        order = rng.permutation(len(names))
        val_idx = set(int(i) for i in order[:n_val])
        train = [Item(names[i], *data[i]) for i in range(len(names)) if i not in val_idx]
        val = [Item(names[i], *data[i]) for i in sorted(val_idx)]
        return (
            train,
            val,
            {
                "held_out": "held-out cases",
                "train_cases": [t.name for t in train],
                "val_cases": [v.name for v in val],
            },
        )
    axis = 2 if dims == 3 else 0
    what = "slices along S" if dims == 3 else "rows"
    train, val, blocks = [], [], {}
    for n, (im, lb) in zip(names, data):
        if lb.shape[axis] < 2:
            raise DatasetError(
                f"case {n} has a single slice along the split axis; add cases for validation."
            )
        t, v, b = _block_split(
            n, im, lb, axis, val_fraction, max(2, patch[axis] // 4), context=patch[axis] // 2
        )
        train.extend(t)
        val.append(v)
        blocks[n] = list(b)
    if not train:
        raise DatasetError("the cases are too small to hold out a validation block; add cases.")
    single = "the single case" if len(names) == 1 else "each case"
    return (
        train,
        val,
        {
            "held_out": f"held-out slices of {single}: a contiguous block of {what} "
            f"({100 * val_fraction:.0f}%) on the model grid, never sampled for training (the "
            "neighbouring slices' image, not labels, is given as context and not scored)",
            "train_cases": names,
            "val_cases": names,
            "blocks": blocks,
            "block_axis": what,
        },
    )


def pad_to(item: Item, patch: list[int]) -> None:
    """Pad ``item`` in place with zeros (image and label), centred, to at least ``patch``."""
    sp = item.label.shape
    pads = [max(0, p - s) for p, s in zip(patch, sp)]
    if any(pads):
        pw = [(q // 2, q - q // 2) for q in pads]
        item.image = np.pad(item.image, [(0, 0), *pw], mode="constant")
        item.label = np.pad(item.label, pw, mode="constant")


def index_foreground(item: Item, rng: np.random.Generator, max_per_class: int = 20000) -> None:
    """Fill ``item.fg``: for each foreground class, up to ``max_per_class`` of its voxel
    coordinates (a random subset, drawn from ``rng``, when there are more)."""
    for k in np.unique(item.label):
        if k == 0:
            continue
        coords = np.argwhere(item.label == k)
        if len(coords) > max_per_class:
            coords = coords[rng.choice(len(coords), max_per_class, replace=False)]
        item.fg[int(k)] = coords


def sample_batch(
    items: list[Item], patch: list[int], batch: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Random patches; a third centred (with jitter) on a random foreground voxel.

    Parameters
    ----------
    items : list of :class:`Item`
        At least ``patch`` large (:func:`pad_to`); those with ``fg`` filled
        (:func:`index_foreground`) give the foreground-centred patches.
    patch : list of int
        Patch size (voxels).
    batch : int
    rng : numpy.random.Generator

    Returns
    -------
    images : (batch, C, *patch) float32 array
    labels : (batch, 1, *patch) array of the items' label dtype
    """
    xs, ys = [], []
    fg_items = [it for it in items if it.fg]
    for b in range(batch):
        force = fg_items and (b % 3 == 2 if batch >= 3 else rng.random() < FOREGROUND_FRACTION)
        it = fg_items[rng.integers(len(fg_items))] if force else items[rng.integers(len(items))]
        shape = it.label.shape
        if force:
            k = list(it.fg)[rng.integers(len(it.fg))]
            c = it.fg[k][rng.integers(len(it.fg[k]))]
            start = [
                int(np.clip(ci - p // 2 + rng.integers(-(p // 4), p // 4 + 1), 0, s - p))
                for ci, p, s in zip(c, patch, shape)
            ]
        else:
            start = [int(rng.integers(0, s - p + 1)) for p, s in zip(patch, shape)]
        sl = tuple(slice(a, a + p) for a, p in zip(start, patch))
        xs.append(it.image[(slice(None), *sl)])
        ys.append(it.label[sl])
    return np.stack(xs), np.stack(ys)[:, None]
