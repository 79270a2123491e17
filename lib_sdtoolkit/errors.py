"""One exception family for every error a user can cause.

Faces turn these into a message in the UI, exit code 2 on the CLI and a 4xx JSON body on the API.
Messages always name the file (and the key where there is one) and the problem.
"""
from __future__ import annotations

import os
from typing import Optional, Union

PathLike = Union[str, "os.PathLike[str]"]


def _one_line(text: str) -> str:
    """Control characters (a newline in a file name or in a library's message) escaped: an error is one line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


class SdToolkitError(Exception):
    """Base class. ``http_status`` is what the API answers with."""

    http_status = 400

    def __init__(self, message: str, path: Optional[PathLike] = None, key: Optional[str] = None):
        self.message = _one_line(message)
        self.path = os.fspath(path) if path is not None else None
        self.key = key
        parts = []
        if self.path is not None:
            parts.append(_one_line(f"{self.path}"))
        if key is not None:
            parts.append(f"key '{_one_line(str(key))}'")
        prefix = ": ".join(parts)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class ModelFileError(SdToolkitError):
    """A file that is missing, unreadable, truncated or not a model."""


class FileNotFound(ModelFileError):
    http_status = 404


class UnsafeFileError(ModelFileError):
    """A pickle that would run code (refused by ``torch.load(weights_only=True)``)."""


class ArchitectureError(SdToolkitError):
    """Models that do not fit together (SD1 with SDXL) or an architecture we cannot handle."""

    http_status = 422


class InvalidInputError(SdToolkitError):
    """A bad argument: wrong number of block values, unknown preset, ratio out of range..."""

    http_status = 422


class OutputExistsError(SdToolkitError):
    """The output exists (no overwrite asked) or is one of the inputs."""

    http_status = 409


class AccessDeniedError(SdToolkitError):
    """A path outside the configured model folders (API)."""

    http_status = 403


class Cancelled(SdToolkitError):
    """The user pressed Stop; the job left no partial output behind (409: the request was fine, it was stopped)."""

    http_status = 409


class MissingDependencyError(SdToolkitError):
    """An optional Python package a feature needs is not installed; the message names it and how to install it.
    The rest of the toolkit keeps working. 424 (Failed Dependency): the request was fine, this install lacks a
    package."""

    http_status = 424
