"""Double of modules/cache.py (A1111 1.8+, reference section 5): one diskcache.Cache per subsection under
``<data_dir>/cache/<subsection>`` (``SD_WEBUI_CACHE_DIR``), the legacy ``cache.json`` (``SD_WEBUI_CACHE_FILE``)
converted once when the cache folder does not exist yet; ``dump_cache()`` does nothing."""
import json
import os
import threading

import diskcache

from modules.paths import data_path

cache_filename = os.environ.get("SD_WEBUI_CACHE_FILE", os.path.join(data_path, "cache.json"))
cache_dir = os.environ.get("SD_WEBUI_CACHE_DIR", os.path.join(data_path, "cache"))
caches = {}
cache_lock = threading.Lock()


def dump_cache():
    """Nothing to do since the diskcache move (kept for callers)."""


def make_cache(subsection):
    return diskcache.Cache(os.path.join(cache_dir, subsection), size_limit=2 ** 32, disk_min_file_size=2 ** 18)


def convert_old_cached_data():
    try:
        with open(cache_filename, "r", encoding="utf8") as file:
            data = json.load(file)
    except FileNotFoundError:
        return
    for subsection, keyvalues in data.items():
        cache_obj = caches.get(subsection)
        if cache_obj is None:
            cache_obj = caches[subsection] = make_cache(subsection)
        for key, value in keyvalues.items():
            cache_obj[key] = value


def cache(subsection):
    cache_obj = caches.get(subsection)
    if not cache_obj:
        with cache_lock:
            if not os.path.exists(cache_dir) and os.path.isfile(cache_filename):
                convert_old_cached_data()
            cache_obj = caches.get(subsection)
            if not cache_obj:
                cache_obj = caches[subsection] = make_cache(subsection)
    return cache_obj


def cached_data_for_file(subsection, title, filename, func):
    existing_cache = cache(subsection)
    ondisk_mtime = os.path.getmtime(filename)
    entry = existing_cache.get(title)
    if entry:
        if ondisk_mtime > entry.get("mtime", 0):
            entry = None
    if not entry or "value" not in entry:
        value = func()
        if value is None:
            return None
        entry = {"mtime": ondisk_mtime, "value": value}
        existing_cache[title] = entry
        dump_cache()
    return entry["value"]
