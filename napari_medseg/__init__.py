"""napari-medseg: medical image segmentation, detection, registration and denoising for napari.

Importing the package is cheap: torch, MONAI and Qt are imported only by the modules that
need them.
"""

__version__ = "0.1.0"
