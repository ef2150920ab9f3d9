"""The memory estimate counts what HoVerNet and DeepEdit bundles hold beside the class maps."""

from __future__ import annotations

import numpy as np
import pytest

from tests.models.test_bundles import BUNDLES

pytestmark = pytest.mark.skipif(not BUNDLES.is_dir(), reason=f"no bundle configs at {BUNDLES}")


def _rgb(shape=(1000, 1000)):
    from napari_medseg.io.record import ImageRecord

    return ImageRecord(
        data=np.zeros((*shape, 3), np.uint8), affine=np.eye(3), space="pixel", rgb=True
    )


def test_hovernet_maps_and_instances_are_counted():
    from napari_medseg.core.segment.segment import estimate_memory
    from napari_medseg.models.loaders.bundle import load_bundle

    lm = load_bundle(BUNDLES / "pathology_nuclei_segmentation_classification", weights="random")
    rec = _rgb()
    need = estimate_memory(rec, lm)
    n = 1000 * 1000
    # input twice (3 channels), 5 types + 4 nucleus/hv maps + weights, labels, instance ids
    assert need == 4 * (3 * n + 3 * n + (5 + 4 + 1) * n) + 2 * n + 4 * n


def test_guidance_channels_are_counted():
    from napari_medseg.core.segment.segment import estimate_memory
    from napari_medseg.io.record import ImageRecord
    from napari_medseg.models.loaders.bundle import load_bundle

    lm = load_bundle(BUNDLES / "spleen_deepedit_annotation", weights="random")
    rec = ImageRecord(data=np.zeros((64, 64, 32), np.int16), affine=np.eye(4), space="RAS")
    plain = estimate_memory(rec, lm)
    lm.card.extra["guidance_channels"] = 0
    assert plain - estimate_memory(rec, lm) == 4 * 2 * 64 * 64 * 32  # two float32 channels
