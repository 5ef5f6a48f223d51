"""napari-sam: Segment Anything for microscopy in napari.

The plugin is thin: the engine lives in `samcore`, which never imports napari or Qt.
"""

__version__ = "0.1.0"
