"""``napari-medseg view``: open napari with the Segment dock and a scan (the main job)."""

from __future__ import annotations

from collections.abc import Sequence


def launch(
    images: Sequence[str] = (),
    sample: str | None = None,
    screenshot: str | None = None,
    model: str | None = None,
    run: bool = False,
) -> int:
    """Open a napari window with the plugin's Segment dock.

    Parameters
    ----------
    images : sequence of str
        Files or DICOM folders to open; when empty the sample CT opens.
    sample : {"ct", "mri", "pathology", "nuclei"}, optional
        A sample to open (File > Open Sample > napari-medseg).
    screenshot : str, optional
        Save a PNG of the whole window and close instead of running the event loop. With
        ``run`` the segmentation runs first (as a user pressing Run) and the screenshot shows
        its result.
    model : str, optional
        Model to preselect in the dock.
    run : bool
        Press Run once the window is up.
    """
    import napari

    from napari_medseg.widgets._layers import use_radiological_view
    from napari_medseg.widgets.segment import SegmentWidget

    viewer = napari.Viewer(title="napari-medseg")
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment", area="right")
    if images:
        for image in images:
            viewer.open(image, plugin="napari-medseg")
    else:
        viewer.open_sample("napari-medseg", sample or "ct")
    if any(layer.metadata.get("medseg", {}).get("space") == "RAS" for layer in viewer.layers):
        use_radiological_view(viewer)
    if model:
        widget.model.value = model
    if screenshot:
        from qtpy.QtWidgets import QApplication

        if run:
            widget.run_button.native.click()
            while widget._worker is not None:
                QApplication.processEvents()
        viewer.window._qt_window.resize(1400, 850)
        for _ in range(20):
            QApplication.processEvents()
        viewer.screenshot(screenshot, canvas_only=False)
        viewer.close()
        return 0
    napari.run()
    return 0
