"""The README's main job: `napari-medseg view` opens napari with the dock and the sample CT."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.gui


@pytest.mark.skipif(not os.environ.get("DISPLAY"), reason="needs an X server (run under xvfb-run)")
def test_view_opens_the_window_with_the_sample_ct(tmp_path):
    png = tmp_path / "window.png"
    out = subprocess.run(
        [sys.executable, "-m", "napari_medseg.cli", "view", "--screenshot", str(png)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    from skimage.io import imread

    img = imread(str(png))
    assert img.shape[0] > 400 and img.shape[1] > 600
    assert np.asarray(img)[..., :3].std() > 10  # a real picture, not a blank window
