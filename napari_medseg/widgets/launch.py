"""``napari-medseg view``: open napari with the Segment dock and a scan (the main job)."""

from __future__ import annotations

from collections.abc import Sequence


def launch(
    images: Sequence[str] = (),
    sample: str | None = None,
    screenshot: str | None = None,
    model: str | None = None,
    run: bool = False,
    device: str = "auto",
    size: tuple[int, int] = (1400, 850),
) -> int:
    """Open a napari window with the plugin's Segment dock (the one Plugins > Medical
    Segmentation > Segment opens), through napari's public API only.

    Parameters
    ----------
    images : sequence of str
        Files or DICOM folders to open; when empty (and no ``sample``) the sample CT opens.
        Files napari-medseg claims (see :func:`napari_medseg.io.napari_io.claims`) open with
        its reader, anything else with napari's.
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
    device : {"auto", "cpu", "cuda", "mps"}
        Device to preselect in the dock.
    size : (int, int)
        Window width and height in logical pixels.

    Returns
    -------
    int
        0 when the window was closed (or the screenshot saved).
    """
    import napari

    from napari_medseg.io.napari_io import claims
    from napari_medseg.widgets._layers import apply_view_convention, is_volume_layer

    viewer = napari.Viewer(title="napari-medseg")
    viewer.window.resize(*size)
    _, widget = viewer.window.add_plugin_dock_widget("napari-medseg", "Segment")
    if images:
        for image in images:
            viewer.open(image, plugin="napari-medseg" if claims(image) else None)
    if sample or not images:
        viewer.open_sample("napari-medseg", sample or "ct")
    if any(is_volume_layer(layer) for layer in viewer.layers):
        apply_view_convention(viewer)
    if model:
        widget.model.value = model
    widget.device.value = device
    if run:
        widget.run_button.native.click()
    if screenshot:
        app = napari.qt.get_qapp()
        while run and not widget.run_button.enabled:  # the worker is running
            app.processEvents()
        for _ in range(20):
            app.processEvents()
        viewer.reset_view()  # the whole scan in the canvas the dock leaves
        app.processEvents()
        viewer.screenshot(screenshot, canvas_only=False)
        viewer.close()
        return 0
    napari.run()
    return 0
