"""Double of modules/ui_extra_networks.py (A1111 1.10): the registry of extra-networks pages (the cards tabs under
txt2img/img2img) and the page base class with the helpers pages use to build their items. ``initialize()`` empties
the registry at start-up (then the WebUI registers its default pages and ``on_before_ui`` callbacks add theirs);
``register_page(page)`` appends and recomputes the folders previews may be served from. The HTML rendering and the
``/sd_extra_networks/*`` routes are not doubled; ``page.refresh()`` + ``list(page.list_items())`` is what the UI
renders."""
import os
import urllib.parse
from pathlib import Path

from modules import extra_networks, shared

extra_pages = []
allowed_dirs = set()
default_allowed_preview_extensions = ["png", "jpg", "jpeg", "webp", "gif", "mp4"]


def allowed_preview_extensions():
    return set(default_allowed_preview_extensions) | {shared.opts.samples_format}


def register_page(page):
    """registers extra networks page for the UI; recommend doing it in on_before_ui() callback for extensions"""
    extra_pages.append(page)
    allowed_dirs.clear()
    allowed_dirs.update(set(sum([x.allowed_directories_for_previews() for x in extra_pages], [])))


def initialize():
    extra_pages.clear()


def quote_js(s):
    s = s.replace("\\", "\\\\")
    s = s.replace('"', '\\"')
    return f'"{s}"'


class ExtraNetworksPage:
    def __init__(self, title):
        self.title = title
        self.name = title.lower()
        self.extra_networks_tabname = self.name.replace(" ", "_")
        self.allow_prompt = True
        self.allow_negative_prompt = False
        self.metadata = {}
        self.items = {}

    def refresh(self):
        pass

    def read_user_metadata(self, item, use_cache=True):
        filename = item.get("filename", None)
        metadata = extra_networks.get_user_metadata(filename)
        desc = metadata.get("description", None)
        if desc is not None:
            item["description"] = desc
        item["user_metadata"] = metadata

    def link_preview(self, filename):
        quoted_filename = urllib.parse.quote(filename.replace("\\", "/"))
        mtime = os.path.getmtime(filename)
        return f"./sd_extra_networks/thumb?filename={quoted_filename}&mtime={mtime}"

    def search_terms_from_path(self, filename, possible_directories=None):
        abspath = os.path.abspath(filename)
        for parentdir in (possible_directories if possible_directories is not None
                          else self.allowed_directories_for_previews()):
            parentdir = os.path.dirname(os.path.abspath(parentdir))
            if abspath.startswith(parentdir):
                return os.path.relpath(abspath, parentdir)
        return ""

    def create_item(self, name, index=None):
        raise NotImplementedError()

    def list_items(self):
        raise NotImplementedError()

    def allowed_directories_for_previews(self):
        return []

    def get_sort_keys(self, path):
        pth = Path(path)
        st = os.stat(path)
        return {"date_created": int(st.st_mtime), "date_modified": int(st.st_ctime), "name": pth.name.lower(),
                "path": str(pth).lower()}

    def find_preview(self, path):
        for file in sum([[f"{path}.{ext}", f"{path}.preview.{ext}"] for ext in allowed_preview_extensions()], []):
            if os.path.exists(file):
                return self.link_preview(file)
        return None

    def find_description(self, path):
        for file in [f"{path}.txt", f"{path}.description.txt"]:
            if not os.path.exists(file):
                continue
            try:
                with open(file, "r", encoding="utf-8", errors="replace") as f:
                    return f.read()
            except OSError:
                pass
        return None
