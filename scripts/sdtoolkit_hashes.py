"""WebUI adapter: tell lib_sdtoolkit where this WebUI keeps its hash cache.

Hashes the toolkit computes inside the WebUI (Hashes & dedup tab, POST /sdtoolkit/v1/hash) are mirrored into the
WebUI's own cache (``<data_dir>/cache/hashes`` and ``hashes-addnet``, diskcache, or the older ``cache.json``) under
the titles the WebUI looks up (``checkpoint/<name>``, ``lora/<name>``), so the model hash shown in the UI and
written to infotext is the one computed here, without the WebUI hashing the file again.

The WebUI host is built by the tab/API adapters from plain values; the data folder reaches the library through
``SDTOOLKIT_WEBUI_DATA_DIR`` (read by ``lib_sdtoolkit.files.hash_cache.webui_cache_for_host``). The WebUI's own
``SD_WEBUI_CACHE_DIR`` / ``SD_WEBUI_CACHE_FILE`` overrides are honoured there too.
"""
import os

from modules import paths

import lib_sdtoolkit.files.hash_cache as sdt_hash_cache  # noqa: F401  (imported while the extension is on sys.path)

os.environ["SDTOOLKIT_WEBUI_DATA_DIR"] = os.path.abspath(paths.data_path)
