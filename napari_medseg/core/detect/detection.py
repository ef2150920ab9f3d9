"""Object detection in 2D and 3D, the entry points: :func:`detect` runs a model, whatever its
kind; :func:`load_detector` turns a name into a detector (a model, or a classical choice).

The pieces: :mod:`~napari_medseg.core.detect.result` (the table, filtering, box IoU),
:mod:`~napari_medseg.core.detect.instances` (objects from a segmentation model: watershed and
measurement), :mod:`~napari_medseg.core.detect.classical` (the Otsu + watershed baseline),
:mod:`~napari_medseg.core.detect.boxes` (the centre-heatmap box detector). A segmentation model
gives watershed instances (an instance map and the table), a box detector (``task ==
"detection"``) fills the same table without an instance map.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

from napari_medseg.core.detect.boxes import detect_boxes
from napari_medseg.core.detect.classical import detect_classical
from napari_medseg.core.detect.instances import check_record, detect_instances
from napari_medseg.core.detect.result import DetectionResult
from napari_medseg.errors import MedsegError
from napari_medseg.progress import Progress

if TYPE_CHECKING:  # pragma: no cover
    from napari_medseg.io.record import ImageRecord
    from napari_medseg.models.networks import LoadedModel

__all__ = ["CLASSICAL_DETECTORS", "detect", "load_detector"]

#: The classical detectors :func:`load_detector` knows, by name.
CLASSICAL_DETECTORS: dict[str, Callable[..., Generator]] = {
    "classical": detect_classical,
    "classical-dark": functools.partial(detect_classical, dark_objects=True),
    "classical-he": functools.partial(detect_classical, stain="hematoxylin"),
}


def load_detector(ref: str) -> Any:
    """The detector for ``ref``: ``"classical"`` (bright objects), ``"classical-dark"`` (dark
    objects on grey bright-field), ``"classical-he"`` (nuclei from the haematoxylin channel of an
    RGB H&E/IHC image) or a model name/folder, loaded on the CPU (a
    :class:`~napari_medseg.models.networks.LoadedModel` for :func:`detect`).

    A classical detector is a generator function ``f(record) -> DetectionResult``.
    """
    if ref in CLASSICAL_DETECTORS:
        return CLASSICAL_DETECTORS[ref]
    from napari_medseg.models.registry import load_model

    return load_model(ref, device="cpu")


def detect(
    record: ImageRecord,
    model: LoadedModel,
    *,
    min_distance: float | None = None,
    split: bool = True,
    device: Any = "auto",
    overlap: float | None = None,
    batch_size: int = 4,
    tta: bool = False,
) -> Generator[Progress, None, DetectionResult]:
    """Detect objects with a model: dispatches on the model card.

    * ``task == "detection"`` (a box detector, ``card.detection.head == "centernet"``):
      :func:`napari_medseg.core.detect.boxes.detect_boxes` (centre heatmap peaks + regressed box
      sizes; ``instances`` is None; ``tta`` and ``split`` do not apply).
    * ``task == "segmentation"``: watershed instances of the model's foreground
      (:func:`napari_medseg.core.detect.instances.detect_instances`).

    Parameters
    ----------
    record : ImageRecord
        2D image or 3D volume (file axis order).
    model : LoadedModel
        A segmentation model whose dimensions fit the image (a 2D model runs slice by slice
        on a volume, as in :func:`~napari_medseg.core.segment.segment.segment`), or a box
        detector of the image's dimension.
    min_distance : float, optional
        Smallest seed distance of the watershed, in pixels (2D) or mm (3D); default 4 px in
        2D and 4 x the smallest voxel size in 3D. For a box detector: the smallest distance
        between two centres (default the card's ``nms_radius``, 3 voxels).
    split : bool
        False: connected components only.
    device, overlap, batch_size, tta
        Passed to :func:`~napari_medseg.core.segment.segment.segment`.

    Returns
    -------
    DetectionResult
        All objects (no score or size filtering: use
        :func:`~napari_medseg.core.detect.result.filter_detections`).
    """
    check_record(record)
    card = model.card
    if card.task == "detection":
        result = yield from detect_boxes(
            record,
            model,
            device=device,
            overlap=overlap,
            batch_size=batch_size,
            min_distance=min_distance,
        )
        if tta:
            result.provenance["notes"] = ["flip TTA is not applied to box detectors"]
        return result
    if card.task != "segmentation":
        raise MedsegError(
            f"model {card.name!r} is a model for {card.task}; detection needs a segmentation "
            "model or a box detector"
        )
    return (
        yield from detect_instances(
            record,
            model,
            min_distance=min_distance,
            split=split,
            device=device,
            overlap=overlap,
            batch_size=batch_size,
            tta=tta,
        )
    )
