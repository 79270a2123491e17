"""WebUI hook: ``preload(parser)`` adds the ``--sdtoolkit-*`` command-line flags.

The WebUI execs this file before parsing its command line strictly (an unknown flag aborts startup), and without
the extension folder on ``sys.path``: so this file imports nothing but the standard library.
"""
import argparse
import os


def preload(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("SD Toolkit")
    group.add_argument("--sdtoolkit-models-dir", type=str, default=None,
                       help="SD Toolkit: models root to use instead of the WebUI's models/ folder "
                            "(with Stable-diffusion/, VAE/, Lora/, ControlNet/ inside)")
    group.add_argument("--sdtoolkit-output-dir", type=str, default=None,
                       help="SD Toolkit: folder for merged / pruned / extracted files (default: the models folder)")
    group.add_argument("--sdtoolkit-device", type=str, default=os.environ.get("SDTOOLKIT_DEVICE", "auto"),
                       help="SD Toolkit: device for merges and conversions: auto, cpu, cuda, cuda:N, mps")
    group.add_argument("--sdtoolkit-no-api", action="store_true",
                       help="SD Toolkit: do not add the /sdtoolkit/v1 HTTP routes")
