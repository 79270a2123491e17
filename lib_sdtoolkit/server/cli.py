"""``serve``'s command-line face lives in :mod:`lib_sdtoolkit.serve_cli` (outside this package, so that the other
commands do not import FastAPI); the names stay importable from here."""
from __future__ import annotations

from ..serve_cli import (DEFAULT_HOST, DEFAULT_PORT, LOOPBACK, SAMPLE_MODELS_DIR, ensure_models, make_host,  # noqa: F401
                         port_problem, register, serve)

__all__ = ["register", "serve", "make_host", "ensure_models", "port_problem", "DEFAULT_HOST", "DEFAULT_PORT"]
