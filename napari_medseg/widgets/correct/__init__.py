"""The "Correct & Train" dock widget: correction tools, clicks, live volumes, safe saving,
worklists, recovery of every edited layer, and fine-tuning on the corrections.

The manifest's ``napari_medseg.widgets.correct:CorrectWidget`` is the dock in :mod:`.dock`.
"""

from napari_medseg.widgets.correct.dock import CorrectWidget
from napari_medseg.widgets.correct.session import layer_spacing

__all__ = ["CorrectWidget", "layer_spacing"]
