"""One multi-channel case from one file per channel (nnU-Net's ``CASE_0000``, ``CASE_0001``...)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from napari_medseg.errors import MedsegError

if TYPE_CHECKING:  # pragma: no cover
    from napari_medseg.io.record import ImageRecord

__all__ = ["stack_channels"]


def stack_channels(records: Sequence[ImageRecord], atol_mm: float = 1e-3) -> ImageRecord:
    """Stack single-channel images of one case into one record, channels on the last axis.

    Parameters
    ----------
    records : sequence of ImageRecord
        Channel 0, 1, ... in order; each must have one channel and the same voxel grid (shape
        and affine within ``atol_mm``), as nnU-Net requires of a case's files.
    atol_mm : float
        Tolerance on the affines (mm).

    Returns
    -------
    ImageRecord
        ``(*spatial, C)`` float32 (or the common dtype), the first record's geometry and
        metadata; ``metadata["channel_files"]`` lists the sources.

    Raises
    ------
    MedsegError
        A channel with several channels of its own, or another grid than the first.
    """
    from napari_medseg.io.record import ImageRecord

    if not records:
        raise MedsegError("no images given")
    first = records[0]
    if len(records) == 1:
        return first
    arrays = []
    for r in records:
        if len(r.shape) != r.spatial_ndim or r.rgb:
            raise MedsegError(
                f"{r.name!r} has {len(r.shape) - r.spatial_ndim} extra axes; give one file per "
                "channel, each a single-channel image"
            )
        if r.spatial_shape != first.spatial_shape or not np.allclose(
            r.affine, first.affine, atol=atol_mm
        ):
            raise MedsegError(
                f"the channel files of one case must share one voxel grid: {r.name!r} has shape "
                f"{r.spatial_shape} and orientation {r.orientation or '-'}, {first.name!r} has "
                f"{first.spatial_shape} and {first.orientation or '-'}"
            )
        arrays.append(np.asarray(r.data))
    meta = dict(first.metadata or {})
    meta["channel_files"] = [r.path for r in records]
    return ImageRecord(
        data=np.stack(arrays, axis=-1),
        affine=first.affine,
        space=first.space,
        modality=first.modality,
        name=first.name,
        path=first.path,
        metadata=meta,
    )
