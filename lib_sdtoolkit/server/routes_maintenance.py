"""``POST /sdtoolkit/v1/prune``, ``/sdtoolkit/v1/hash``, ``/sdtoolkit/v1/dedup``: the maintenance jobs.

The bodies are the jobs' requests (:mod:`lib_sdtoolkit.jobs.maintenance`; an unknown field is a 422); every name
in them goes through the host's gate (model files: names or paths under the model folders; ``..`` and absolute
paths elsewhere answer 403, missing files 404).

* prune: ``path``, ``kind``, ``output`` (a file name written into the folder of the input's kind, or the VAE
  folder for ``only: ["vae"]``; blank: named from the options), ``dtype`` (fp16|bf16|fp32|keep), ``keep_ema``,
  ``keep_junk``, ``fix_position_ids``, ``only`` (list or comma string), ``bare``, ``overwrite``. Answers the prune
  result with ``name``/``kind`` of the output; ``written: false`` (and a ``note``) when nothing would change.
* hash: ``paths`` (list), ``kind``, ``algos`` (default all). Answers ``results`` (sha256, autov2, autov1, autov3,
  blake3, crc32, civitai names), ``problems``, ``webui_cache_entries``.
* dedup: ``kind`` (vae|checkpoint|lora|controlnet|any), ``folders`` (default: the kind's model folders),
  ``action`` (report|hardlink|move), ``to`` (move target under the model folders), ``confirm`` (true, required by
  hardlink and move). Answers groups, gain, problems, actions and a ready-made table.
"""
from __future__ import annotations

from fastapi import APIRouter

from ..host import Host
from ..jobs import get as get_job
from ..jobs.faces import add_route, host_progress

PREFIX = "/sdtoolkit/v1"


def register(router: APIRouter, host: Host) -> None:
    for name in ("prune", "hash", "dedup"):
        add_route(router, host, get_job(name), f"{PREFIX}/{name}", progress=host_progress)
