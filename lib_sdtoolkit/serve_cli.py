"""``python -m lib_sdtoolkit serve``: the standalone web app (UI + HTTP API) over a models folder.

Outside the ``server`` package on purpose: the command line imports every command module to build its parser,
and importing anything under ``lib_sdtoolkit.server`` first runs its ``__init__``, which imports FastAPI
(1 s idle, 8 s on a loaded 2-core machine) -- a cost every other command (``hash``, ``inspect``...) paid for
nothing. The app is imported only when ``serve`` runs."""
from __future__ import annotations

import argparse
import sys
from typing import Any, Optional, TextIO

from .errors import InvalidInputError
from .host import StandaloneHost

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7870
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("serve", help="start the web app (UI + HTTP API) on a models folder",
                              description="Start the SD Toolkit web app. Binds 127.0.0.1 unless --host says otherwise.")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--models-dir", metavar="DIR",
                       help="models folder laid out like the WebUI's (Stable-diffusion/, VAE/, Lora/, ControlNet/); "
                            "default: ./sample_models with --sample, else $SDTOOLKIT_MODELS_DIR or ./models")
    where.add_argument("--webui-dir", metavar="DIR", help="use an existing WebUI's models/ folders")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST})")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--sample", action="store_true",
                   help="if no models are found, create the generated sample library without asking "
                        "(in ./sample_models unless a folder is given)")
    p.add_argument("--no-ui", action="store_true", help="serve only the HTTP API")
    p.add_argument("--json", action="store_true",
                   help="print one JSON line on stdout once the address is free: {url, models_dir, ui}")
    p.set_defaults(func=serve)


SAMPLE_MODELS_DIR = "sample_models"


def make_host(args: argparse.Namespace) -> StandaloneHost:
    """The host for ``serve``: --webui-dir, --models-dir, else ./sample_models with --sample, else the default
    ($SDTOOLKIT_MODELS_DIR or ./models)."""
    if not (0 < int(args.port) < 65536):
        raise InvalidInputError(f"--port {args.port} is not a valid port number")
    models_dir = args.models_dir
    if models_dir is None and args.webui_dir is None and args.sample:
        models_dir = SAMPLE_MODELS_DIR
    return StandaloneHost(models_dir=models_dir, webui_dir=args.webui_dir, create=args.webui_dir is None)


def ensure_models(host: StandaloneHost, sample: bool, stdin: Optional[TextIO] = None,
                  stdout: Optional[TextIO] = None) -> bool:
    """If the models folder is empty: create the sample library (``sample`` or the user says yes on a terminal).

    Returns True when a sample library was written."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    if not host.is_empty() or host.models_root is None:
        return False
    if not sample:
        if not (hasattr(stdin, "isatty") and stdin.isatty()):
            print(f"No models in {host.models_root}; the app offers to create a sample library "
                  f"(or start with --sample).", file=stdout)
            return False
        stdout.write(f"No models in {host.models_root}. Create a small generated sample library there? [Y/n] ")
        stdout.flush()
        answer = stdin.readline().strip().lower()
        if answer not in ("", "y", "yes"):
            return False
    from .samples import library  # heavy; only when needed

    print(f"Writing the sample library to {host.models_root} ...", file=stdout)
    library.write_sample_library(host.models_root)
    host.refresh(None)
    return True


def port_problem(host: str, port: int) -> Optional[str]:
    """Why ``host:port`` cannot be bound (with a free port to try instead), or None when it can. Checked before
    the app starts, so a busy port gives this message instead of uvicorn's traceback after the URL was printed."""
    import errno
    import socket

    def try_bind(p: int) -> Optional[OSError]:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
            try:
                s.bind((host, p))
            except OSError as e:
                return e
        return None

    err = try_bind(port)
    if err is None:
        return None
    if err.errno not in (errno.EADDRINUSE, errno.EACCES):
        return f"cannot listen on {host}:{port}: {err.strerror or err}"
    why = "is already in use (another SD Toolkit or WebUI?)" if err.errno == errno.EADDRINUSE else \
        "needs more rights than this user has"
    free = next((p for p in range(port + 1, min(port + 50, 65536)) if try_bind(p) is None), None)
    hint = f"; try --port {free} (it is free)" if free else "; pick another one with --port"
    return f"port {port} on {host} {why}{hint}"


def serve(args: argparse.Namespace) -> int:
    host = make_host(args)
    problem = port_problem(args.host, int(args.port))
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    from .outputs import sweep_host_temps

    for removed in sweep_host_temps(host):
        print(f"removed a stale temporary file left by a killed write: {removed}", file=sys.stderr)
    ensure_models(host, args.sample, stdout=sys.stderr if getattr(args, "json", False) else None)
    from .server.app import create_app

    app = create_app(host, ui=not args.no_ui)
    if args.host not in LOOPBACK:
        print(f"warning: binding {args.host}: anyone who can reach this address can read your model folders' "
              f"listings and files' metadata", file=sys.stderr)
    import uvicorn

    shown = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{shown}:{args.port}/"
    if getattr(args, "json", False):
        import json

        print(json.dumps({"url": url, "models_dir": str(host.models_root) if host.models_root else None,
                          "ui": not args.no_ui}), flush=True)
    print(f"SD Toolkit on {url}  (models: {host.models_root})", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=int(args.port), log_level="warning")
    return 0


__all__ = ["register", "serve", "make_host", "ensure_models", "port_problem", "DEFAULT_HOST", "DEFAULT_PORT"]
