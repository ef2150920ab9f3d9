"""Errors meant for people: one clear sentence, no traceback needed."""

from __future__ import annotations


class MedsegError(Exception):
    """Base class of all errors napari-medseg raises for a person to read.

    The message is one sentence that says what is wrong and, where possible, what to do.
    """


class ImageReadError(MedsegError, ValueError):
    """A file or folder could not be read as a medical image."""


class ImageWriteError(MedsegError, OSError):
    """An image or mask could not be written."""


class CancelledError(MedsegError):
    """Long work was cancelled by the user."""
