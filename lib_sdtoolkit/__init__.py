"""SD Toolkit: one tensor-ops library for Stable Diffusion model files.

The library knows nothing of any host; the WebUI scripts (``scripts/``), the command line
(``python -m lib_sdtoolkit``) and the standalone app (``python -m lib_sdtoolkit serve``) call it.
"""

__version__ = "0.1.0"
