"""Double of modules/extensions.py (reference section 1.3): ``list_extensions()`` scans the built-in folder, then the
user folder (sorted), into ``extensions``; ``active()`` lists the enabled ones. Disabled names come from the
``disabled_extensions`` setting. Metadata (metadata.ini) and git details are not doubled."""
import os

from modules import paths_internal, shared


class Extension:
    def __init__(self, name, path, enabled=True, is_builtin=False):
        self.name = name
        self.canonical_name = name.lower()
        self.path = path
        self.enabled = enabled
        self.is_builtin = is_builtin


extensions = []


def active():
    if getattr(shared.cmd_opts, "disable_all_extensions", False):
        return []
    return [x for x in extensions if x.enabled]


def list_extensions():
    extensions.clear()
    disabled = set(shared.opts.data.get("disabled_extensions", []) or [])
    for dirname, is_builtin in ((paths_internal.extensions_builtin_dir, True), (paths_internal.extensions_dir, False)):
        if not os.path.isdir(dirname):
            continue
        for name in sorted(os.listdir(dirname)):
            path = os.path.join(dirname, name)
            if not os.path.isdir(path):
                continue
            extensions.append(Extension(name, path, enabled=name not in disabled, is_builtin=is_builtin))
    return extensions
