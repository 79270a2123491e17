"""Where models live, where outputs go, settings and progress: the one thing that differs between faces.

A ``Host`` is handed to every UI tab builder and HTTP route module. Two implementations live here:

* ``StandaloneHost`` for the CLI / standalone app: a models folder laid out like the WebUI's
  (``Stable-diffusion``, ``VAE``, ``Lora``, ``ControlNet``), or an existing WebUI's ``models/`` via ``webui_dir``.
* ``WebUIHost`` for the A1111 / Forge adapter. It takes plain paths and callables (``scripts/`` reads them
  from the WebUI's ``modules`` and passes them in), so this module never imports the WebUI.

``resolve()`` is the gate the HTTP API uses: it only ever returns files under the configured model folders.
"""
from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, MutableMapping, Optional, Sequence, Union

from .errors import AccessDeniedError, FileNotFound, InvalidInputError, ModelFileError
from .validate import check_path_text

PathLike = Union[str, "os.PathLike[str]"]

MODEL_KINDS: tuple = ("checkpoint", "vae", "lora", "controlnet")
MODEL_EXTENSIONS: tuple = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
#: sub-folders of a WebUI ``models/`` folder, per kind
WEBUI_SUBDIRS: Dict[str, str] = {
    "checkpoint": "Stable-diffusion",
    "vae": "VAE",
    "lora": "Lora",
    "controlnet": "ControlNet",
}

#: a WebUI checkpoint title ends with its short hash: ``name.safetensors [a1b2c3d4e5]``
_TITLE_HASH = re.compile(r"\s+\[[0-9a-fA-F]{8,64}\]$")

ProgressSink = Callable[[str, int, Optional[int]], None]
ProgressUpdate = Callable[..., None]


def natural_key(text: str) -> list:
    """Sort key that orders ``model2`` before ``model10`` (case-insensitive), like the WebUI's lists."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def _check_kind(kind: Optional[str]) -> None:
    if kind is not None and kind not in MODEL_KINDS:
        raise InvalidInputError(f"unknown model kind '{kind}' (expected one of {', '.join(MODEL_KINDS)})")


def _norm(path: PathLike) -> Path:
    """Absolute, normalised path without following symlinks (models folders are often symlinked)."""
    return Path(os.path.normpath(os.path.abspath(os.fspath(path))))


def _is_under(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def _tqdm_sink() -> ProgressSink:
    """The host's default progress sink: the one tqdm adapter (:func:`lib_sdtoolkit.progress.tqdm_progress`, quiet
    when stderr is not a terminal)."""
    from .progress import tqdm_progress

    bars = tqdm_progress()
    return lambda desc, done, total: bars(desc, done, total, "")


@dataclass
class ModelHooks:
    """How a face lets the toolkit change the model it holds in memory (the WebUI's current checkpoint).

    Plain callables, given by the face (``scripts/`` builds them from the WebUI's ``modules``):

    * ``get_model()`` -> the loaded model (an ``nn.Module`` whose ``state_dict()`` keys are checkpoint keys once
      ``begin_change`` ran) or None when nothing is loaded;
    * ``checkpoint_file(model)`` -> the file the model's weights were loaded from (None if unknown);
    * ``identity(model)`` -> an object that changes whenever the face loads other weights (the WebUI's
      ``sd_checkpoint_info``); a merge recorded on the model is current only while it is the same object;
    * ``begin_change(model)`` -> prepare for an in-place weight change (the WebUI undoes its hijack so the keys
      are the checkpoint's, and drops LoRA weight backups);
    * ``end_change(model, info)`` -> after the change (re-hijack, VAE, model-loaded callbacks); ``info`` is None when
      the change failed, else a dict with ``name``, ``title``, ``sha256``, ``metadata`` for the merged model;
    * ``reload(model, path)`` -> load the weights of checkpoint ``path`` again (restore), optional.
    """

    get_model: Callable[[], Any]
    checkpoint_file: Callable[[Any], Optional[str]] = lambda model: None
    identity: Callable[[Any], Any] = lambda model: model
    begin_change: Callable[[Any], None] = lambda model: None
    end_change: Callable[[Any, Optional[Mapping[str, Any]]], None] = lambda model, info: None
    reload: Optional[Callable[[Any, str], Any]] = None


class Host(ABC):
    """Where models live for one face. Subclasses implement ``model_dirs``; the rest has working defaults."""

    #: short name of the face ("standalone", "webui", "forge")
    name: str = "host"
    #: the model kinds this host has folders for (the gate in ``outputs.py`` reads it)
    kinds: tuple = MODEL_KINDS
    #: the device jobs use when a request names none: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``...
    #: The WebUI's ``--sdtoolkit-device``; ``$SDTOOLKIT_DEVICE`` for the CLI and the standalone app; else cpu.
    device: str = os.environ.get("SDTOOLKIT_DEVICE", "cpu") or "cpu"

    def compute_device(self, requested: Optional[str] = None) -> str:
        """The device a job runs on: the request's when given, else this host's (``auto`` resolved here)."""
        from .validate import available_devices, check_device

        want = requested or self.device or "cpu"
        if want == "auto":
            devs = available_devices()
            want = "cuda" if "cuda" in devs else ("mps" if "mps" in devs else "cpu")
        return check_device(want, "device" if requested else "--sdtoolkit-device")

    def __init__(self, settings: Optional[MutableMapping[str, Any]] = None,
                 progress_sink: Optional[ProgressSink] = None) -> None:
        self.settings: MutableMapping[str, Any] = settings if settings is not None else {}
        self._progress_sink = progress_sink

    # ---- folders -------------------------------------------------------------------------------------------
    @abstractmethod
    def model_dirs(self, kind: str) -> List[Path]:
        """Folders searched for models of ``kind`` (may not all exist), first one preferred."""

    def output_dir(self, kind: str) -> Path:
        """Where new files of ``kind`` are written (created on demand by the writers' callers)."""
        _check_kind(kind)
        dirs = self.model_dirs(kind)
        if not dirs:
            raise InvalidInputError(f"no folder is configured for {kind} models")
        return dirs[0]

    @property
    def models_root(self) -> Optional[Path]:
        """A WebUI-style ``models/`` folder the sample library can be written into, or None."""
        return None

    def all_model_dirs(self) -> List[Path]:
        out: List[Path] = []
        for kind in MODEL_KINDS:
            for d in self.model_dirs(kind):
                if d not in out:
                    out.append(d)
        return out

    # ---- listing -------------------------------------------------------------------------------------------
    def list_models(self, kind: str) -> List[Path]:
        """Model files of ``kind`` (recursive, known extensions, natural sort, no duplicates)."""
        _check_kind(kind)
        from .files.walk import walk_files

        found: Dict[Path, str] = {}
        for folder in self.model_dirs(kind):
            folder = _norm(folder)
            for p in walk_files(folder, MODEL_EXTENSIONS):
                if p not in found:
                    found[p] = p.relative_to(folder).as_posix()
        return sorted(found, key=lambda p: natural_key(found[p]))

    def display_name(self, path: PathLike, kind: Optional[str] = None) -> str:
        """``path`` relative to the model folder holding it (posix separators), else the full path."""
        p = _norm(path)
        kinds = [kind] if kind else list(MODEL_KINDS)
        for k in kinds:
            for folder in self.model_dirs(k):
                folder = _norm(folder)
                if _is_under(p, folder):
                    return p.relative_to(folder).as_posix()
        return str(p)

    def refresh(self, kind: Optional[str] = None) -> None:
        """Hook called after files were added or removed (the WebUI host re-scans its own lists)."""
        _check_kind(kind)

    # ---- resolving untrusted names --------------------------------------------------------------------------
    def resolve(self, path_or_name: PathLike, kind: Optional[str] = None) -> Path:
        """Turn a name or path from a user / HTTP client into a model file under the configured folders.

        Accepts a path relative to a model folder (``sub/model.safetensors``), a bare name with or without
        extension (``model``), a WebUI title (``model.safetensors [abcdef1234]``), or an absolute path that lies
        inside a model folder. Raises ``AccessDeniedError`` (403) for ``..`` escapes and paths elsewhere,
        ``FileNotFound`` (404) when nothing matches, ``ModelFileError`` (400) for a folder or a non-model suffix.
        """
        _check_kind(kind)
        raw = os.fspath(path_or_name).strip() if path_or_name is not None else ""
        if not raw:
            raise InvalidInputError("no model path given")
        if "\x00" in raw:
            raise InvalidInputError(f"{raw!r}: model path contains a NUL byte")
        check_path_text(raw, "model path")  # NAME_MAX / PATH_MAX / unencodable text: 422, not an OSError
        raw = _TITLE_HASH.sub("", raw)
        kinds = [kind] if kind else list(MODEL_KINDS)
        folders = [_norm(d) for k in kinds for d in self.model_dirs(k)]
        parts = re.split(r"[\\/]+", raw)
        if ".." in parts:
            raise AccessDeniedError("'..' is not allowed in a model path", path=raw)

        if os.path.isabs(raw) or raw.startswith("~"):
            candidate = _norm(os.path.expanduser(raw))
            real = Path(os.path.realpath(candidate))
            if not any(_is_under(candidate, f) or _is_under(real, Path(os.path.realpath(f))) for f in folders):
                raise AccessDeniedError("path is outside the configured model folders", path=raw)
            return self._check_model_file(candidate, raw)

        # relative: try each folder in order
        for folder in folders:
            candidate = _norm(folder / raw)
            if not _is_under(candidate, folder):  # defensive; '..' was rejected above
                raise AccessDeniedError("path is outside the configured model folders", path=raw)
            if candidate.exists():
                return self._check_model_file(candidate, raw)
        # a bare name: match by stem or file name among the listed models
        if len(parts) == 1:
            wanted = raw.lower()
            for k in kinds:
                for p in self.list_models(k):
                    if p.name.lower() == wanted or p.stem.lower() == wanted:
                        return p
        where = ", ".join(str(f) for f in folders) or "(no model folders configured)"
        raise FileNotFound(f"no such model file in {where}", path=raw)

    # ---- the gate: every client path a job uses goes through these four ------------------------------------
    #: True for the command line's host: the user names paths on their own machine and is not confined to folders
    trusted: bool = False

    def resolve_input(self, name: PathLike, kind: Optional[str]) -> Path:
        """A model file a client names (see :meth:`resolve`): 403 outside the folders, 404 when missing."""
        return self.resolve(name, kind)

    def resolve_output(self, name: Optional[str], kind: str, *, suffixes: Sequence[str] = (),
                       default: Optional[str] = None, plain: bool = False, add_suffix: Optional[str] = None) -> Path:
        """Where a job writes a file a client names: relative to ``output_dir(kind)`` or absolute inside a
        configured folder, its real folder inside one (``lib_sdtoolkit.outputs``); ``default`` when empty."""
        from .outputs import MODEL_OUTPUT_SUFFIXES, resolve_output

        return resolve_output(self, name, kind, plain=plain, suffixes=tuple(suffixes) or MODEL_OUTPUT_SUFFIXES,
                              add_suffix=add_suffix, default=default)

    def resolve_folder(self, name: Optional[str], kind: str, *, for_writing: bool = False,
                       base: Optional[PathLike] = None) -> Path:
        """A folder a client names: to read (``hash``/``dedup`` scans: must exist under the kind's model folders)
        or, with ``for_writing``, to move files into (created one level deep; its real place inside a folder)."""
        if for_writing:
            from .outputs import resolve_output_folder

            return resolve_output_folder(self, name, kind, create=True, base=base)
        found = self.resolve_folders([name] if name else [], kind)
        if not found:
            raise InvalidInputError(f"no folder is configured for {kind} models")
        return found[0]

    def resolve_folders(self, names: Optional[Sequence[str]], kind: str = "any") -> List[Path]:
        """Folders a client names to scan; none -> the existing model folders of ``kind`` (all for ``any``)."""
        from .outputs import resolve_input_folders

        return resolve_input_folders(self, names, kind)

    def check_inside(self, path: PathLike, what: str = "file") -> Path:
        """403 unless ``path``'s real folder is a configured one (a file a job is about to change or move)."""
        from .outputs import check_inside

        return check_inside(self, path, what=what)

    @staticmethod
    def _check_model_file(candidate: Path, raw: str) -> Path:
        if not candidate.exists():
            raise FileNotFound("no such file", path=raw)
        if candidate.is_dir():
            raise ModelFileError("is a directory, not a model file", path=raw)
        if not candidate.name.lower().endswith(MODEL_EXTENSIONS):
            raise ModelFileError(f"not a model file (expected one of {', '.join(MODEL_EXTENSIONS)})", path=raw)
        return candidate

    # ---- progress ------------------------------------------------------------------------------------------
    def progress_callback(self, desc: str, total: Optional[int] = None) -> ProgressUpdate:
        """Return ``update(done, total=None)`` reporting progress of a long job to this face.

        Features call it as ``tick = host.progress_callback("merging", n_keys)`` and then ``tick(i)``.
        """
        sink = self._progress_sink or _tqdm_sink()
        state = {"total": total}

        def update(done: int, new_total: Optional[int] = None) -> None:
            if new_total is not None:
                state["total"] = new_total
            sink(desc, int(done), state["total"])

        return update


    # ---- the model held in memory (optional capability) --------------------------------------------------
    #: set by faces that hold a model in memory (the WebUI); None in the CLI and the standalone app
    model_hooks: Optional[ModelHooks] = None

    @property
    def has_loaded_model_support(self) -> bool:
        """True when this face can hand a loaded model to the toolkit (shows the in-memory merge buttons)."""
        return self.model_hooks is not None

    def loaded_model(self) -> Optional[Any]:
        """The model this face has loaded (the WebUI's ``shared.sd_model``), or None."""
        return self.model_hooks.get_model() if self.model_hooks is not None else None

    def loaded_model_file(self, model: Any = None) -> Optional[Path]:
        """The checkpoint file the loaded model came from, or None."""
        if self.model_hooks is None:
            return None
        model = model if model is not None else self.loaded_model()
        f = self.model_hooks.checkpoint_file(model) if model is not None else None
        return Path(f) if f else None

    def loaded_model_identity(self, model: Any = None) -> Any:
        if self.model_hooks is None:
            return None
        model = model if model is not None else self.loaded_model()
        return self.model_hooks.identity(model) if model is not None else None

    def begin_model_change(self, model: Any) -> None:
        if self.model_hooks is not None:
            self.model_hooks.begin_change(model)

    def end_model_change(self, model: Any, info: Optional[Mapping[str, Any]]) -> None:
        if self.model_hooks is not None:
            self.model_hooks.end_change(model, info)

    def restore_loaded_model(self, model: Any, path: PathLike) -> None:
        """Reload checkpoint ``path``'s weights into the loaded model (undoes an in-memory merge)."""
        if self.model_hooks is None or self.model_hooks.reload is None:
            raise InvalidInputError("this face cannot reload the loaded model; load the checkpoint again yourself")
        self.model_hooks.reload(model, os.fspath(path))

class FolderHost(Host):
    """A host configured by plain folder lists per kind."""

    name = "folders"

    def __init__(self, dirs: Mapping[str, Sequence[PathLike]], outputs: Optional[Mapping[str, PathLike]] = None,
                 settings: Optional[MutableMapping[str, Any]] = None, progress_sink: Optional[ProgressSink] = None,
                 refreshers: Optional[Mapping[str, Callable[[], Any]]] = None,
                 models_root: Optional[PathLike] = None) -> None:
        super().__init__(settings=settings, progress_sink=progress_sink)
        self._dirs: Dict[str, List[Path]] = {}
        for kind in MODEL_KINDS:
            seen: List[Path] = []
            for d in dirs.get(kind, ()) or ():
                if d is None or os.fspath(d) == "":
                    continue
                p = _norm(os.path.expanduser(os.fspath(d)))
                if p not in seen:
                    seen.append(p)
            self._dirs[kind] = seen
        for kind in dirs:
            _check_kind(kind)
        self._outputs = {k: _norm(v) for k, v in (outputs or {}).items() if v}
        self._refreshers = dict(refreshers or {})
        self._models_root = _norm(models_root) if models_root else None

    def model_dirs(self, kind: str) -> List[Path]:
        _check_kind(kind)
        return list(self._dirs[kind])

    def output_dir(self, kind: str) -> Path:
        _check_kind(kind)
        if kind in self._outputs:
            return self._outputs[kind]
        return super().output_dir(kind)

    @property
    def models_root(self) -> Optional[Path]:
        return self._models_root

    def refresh(self, kind: Optional[str] = None) -> None:
        _check_kind(kind)
        for k in ([kind] if kind else list(MODEL_KINDS)):
            fn = self._refreshers.get(k)
            if fn is not None:
                fn()


class LocalHost(FolderHost):
    """The command line's host: paths are the user's own, taken as given (relative to the working folder).

    Inputs must exist and be regular files; outputs go where they are named; nothing is confined to model folders
    (``trusted``). Model folders, when given, only serve bare-name look-ups and listings.
    """

    name = "cli"
    trusted = True

    def __init__(self, dirs: Optional[Mapping[str, Sequence[PathLike]]] = None,
                 settings: Optional[MutableMapping[str, Any]] = None) -> None:
        super().__init__(dirs or {}, settings=settings)

    def resolve_input(self, name: PathLike, kind: Optional[str]) -> Path:
        raw = os.fspath(name).strip() if name is not None else ""
        if not raw:
            raise InvalidInputError("no input file given")
        check_path_text(raw, "input path")
        p = _norm(os.path.expanduser(raw))
        if not p.exists():
            if kind and self.model_dirs(kind) and os.sep not in raw and "/" not in raw:
                return super().resolve_input(raw, kind)
            raise FileNotFound("no such file", path=raw)
        if p.is_dir():
            raise ModelFileError("is a directory, not a model file", path=raw)
        return p

    def resolve_output(self, name: Optional[str], kind: str, *, suffixes: Sequence[str] = (),
                       default: Optional[str] = None, plain: bool = False, add_suffix: Optional[str] = None) -> Path:
        raw = str(name if name is not None else "").strip() or (default or "")
        if not raw:
            raise InvalidInputError("give an output file (-o)")
        check_path_text(raw, "output path")
        from .outputs import suffixed

        raw = suffixed(raw, suffixes, add_suffix)
        p = _norm(os.path.expanduser(raw))
        if suffixes and not p.name.lower().endswith(tuple(x.lower() for x in suffixes)):
            raise InvalidInputError(f"the output must end in {', '.join(suffixes)}", path=raw)
        if p.is_dir():
            raise InvalidInputError("the output is a folder; name a file", path=raw)
        return p

    def resolve_folder(self, name: Optional[str], kind: str, *, for_writing: bool = False,
                       base: Optional[PathLike] = None) -> Path:
        raw = str(name or "").strip()
        if not raw:
            raise InvalidInputError("give a folder")
        check_path_text(raw, "folder")
        p = _norm(os.path.expanduser(raw))
        if for_writing:
            if p.exists() and not p.is_dir():
                raise InvalidInputError("names a file, not a folder", path=raw)
            p.mkdir(parents=True, exist_ok=True)
            return p
        if not p.is_dir():
            raise InvalidInputError("no such folder", path=raw)
        return p

    def resolve_folders(self, names: Optional[Sequence[str]], kind: str = "any") -> List[Path]:
        if not names:
            raise InvalidInputError("name at least one folder")
        return [self.resolve_folder(n, kind) for n in names]

    def check_inside(self, path: PathLike, what: str = "file") -> Path:
        return _norm(path)

    def display_name(self, path: PathLike, kind: Optional[str] = None) -> str:
        """Relative to a model folder when under one, else the file's name (what the WebUI's merger records)."""
        name = super().display_name(path, kind)
        return Path(name).name if os.path.isabs(name) else name


def default_models_dir() -> Path:
    """``$SDTOOLKIT_MODELS_DIR`` or ``./models``."""
    return _norm(os.environ.get("SDTOOLKIT_MODELS_DIR") or "models")


class StandaloneHost(FolderHost):
    """Models folder laid out like the WebUI's ``models/`` (for the CLI and the standalone app).

    ``StandaloneHost(models_dir="models")`` uses ``models/Stable-diffusion``, ``models/VAE``, ``models/Lora``,
    ``models/ControlNet``; ``StandaloneHost(webui_dir="/path/to/stable-diffusion-webui")`` uses that WebUI's
    ``models/`` folder (and its ``extensions/sd-webui-controlnet/models`` for ControlNet models if present).
    """

    name = "standalone"

    def __init__(self, models_dir: Optional[PathLike] = None, webui_dir: Optional[PathLike] = None,
                 settings: Optional[MutableMapping[str, Any]] = None, progress_sink: Optional[ProgressSink] = None,
                 create: bool = False) -> None:
        if models_dir is not None and webui_dir is not None:
            raise InvalidInputError("give either a models folder or a WebUI folder, not both")
        extra_cn: List[Path] = []
        if webui_dir is not None:
            webui = _norm(os.path.expanduser(os.fspath(webui_dir)))
            if not webui.is_dir():
                raise FileNotFound("WebUI folder does not exist", path=webui)
            root = webui / "models"
            if not root.is_dir():
                raise ModelFileError("not a WebUI folder (it has no models/ folder)", path=webui)
            cn_ext = webui / "extensions" / "sd-webui-controlnet" / "models"
            if cn_ext.is_dir():
                extra_cn.append(cn_ext)
            self.webui_dir: Optional[Path] = webui
        else:
            root = _norm(os.path.expanduser(os.fspath(models_dir))) if models_dir is not None else default_models_dir()
            self.webui_dir = None
            if root.exists() and not root.is_dir():
                raise ModelFileError("models folder is a file, not a folder", path=root)
        if create:
            for sub in WEBUI_SUBDIRS.values():
                (root / sub).mkdir(parents=True, exist_ok=True)
        dirs = {kind: [root / sub] for kind, sub in WEBUI_SUBDIRS.items()}
        dirs["controlnet"] = dirs["controlnet"] + extra_cn
        super().__init__(dirs, settings=settings, progress_sink=progress_sink, models_root=root)

    def is_empty(self) -> bool:
        """True when no model of any kind is found (the app then offers the sample library)."""
        return not any(self.list_models(kind) for kind in MODEL_KINDS)


class WebUIHost(FolderHost):
    """The A1111 / Forge WebUI's folders, given as plain values by ``scripts/`` (no ``modules`` import here).

    ``webui_host_from(paths, cmd_opts, opts)`` below builds one from the WebUI's objects (duck-typed).
    """

    name = "webui"

    def __init__(self, models_path: PathLike, ckpt_dirs: Iterable[Optional[PathLike]] = (),
                 vae_dirs: Iterable[Optional[PathLike]] = (), lora_dirs: Iterable[Optional[PathLike]] = (),
                 controlnet_dirs: Iterable[Optional[PathLike]] = (), output_dir: Optional[PathLike] = None,
                 settings: Optional[MutableMapping[str, Any]] = None, progress_sink: Optional[ProgressSink] = None,
                 refreshers: Optional[Mapping[str, Callable[[], Any]]] = None, forge: bool = False,
                 model_hooks: Optional[ModelHooks] = None, webui_data_dir: Optional[PathLike] = None,
                 device: Optional[str] = None) -> None:
        root = _norm(models_path)
        dirs = {
            "checkpoint": [root / "Stable-diffusion", *ckpt_dirs],
            "vae": [root / "VAE", *vae_dirs],
            "lora": [*lora_dirs] or [root / "Lora"],
            "controlnet": [root / "ControlNet", *controlnet_dirs],
        }
        outputs = {"checkpoint": output_dir} if output_dir else None
        super().__init__(dirs, outputs=outputs, settings=settings, progress_sink=progress_sink,
                         refreshers=refreshers, models_root=root)
        self.name = "forge" if forge else "webui"
        self.model_hooks = model_hooks
        if device:
            self.device = device
        #: the WebUI's data folder: its hash cache (``cache/``, ``cache.json``) lives there
        self.webui_data_dir = _norm(webui_data_dir) if webui_data_dir else None


def webui_host_from(paths: Any, cmd_opts: Any, opts: Any = None, extension_dir: Optional[PathLike] = None,
                    refreshers: Optional[Mapping[str, Callable[[], Any]]] = None,
                    progress_sink: Optional[ProgressSink] = None, forge: bool = False,
                    model_hooks: Optional[ModelHooks] = None) -> WebUIHost:
    """Build a ``WebUIHost`` from the WebUI's ``modules.paths``, ``shared.cmd_opts`` and ``shared.opts``.

    Reads ``paths.models_path``, ``cmd_opts.ckpt_dir``, ``vae_dir``, ``lora_dir``, ``lyco_dir_backcompat``,
    ``controlnet_dir`` (A1111, Forge 2.0.x), Forge Neo's lists ``ckpt_dirs``, ``vae_dirs``, ``lora_dirs``,
    ``controlnet_dirs`` (``--ckpt-dirs DIR`` given any number of times; ``--forge-ref-a1111-home`` /
    ``--forge-ref-comfy-home`` append to them) and our ``--sdtoolkit-models-dir`` / ``--sdtoolkit-output-dir`` /
    ``--sdtoolkit-device`` flags (preload.py).
    """
    def opt(name: str) -> Any:
        return getattr(cmd_opts, name, None)

    def many(name: str) -> List[Any]:
        v = opt(name)
        return list(v) if isinstance(v, (list, tuple)) else ([v] if v else [])

    models_path = opt("sdtoolkit_models_dir") or getattr(paths, "models_path")
    ckpt = [opt("ckpt_dir"), *many("ckpt_dirs")]
    vae = [opt("vae_dir"), *many("vae_dirs")]
    lora = [opt("lora_dir") or os.path.join(models_path, "Lora"), *many("lora_dirs"), opt("lyco_dir_backcompat")]
    cn = [opt("controlnet_dir"), *many("controlnet_dirs")]
    ext_root = getattr(paths, "data_path", None) or getattr(paths, "script_path", None)
    if ext_root:
        cn.append(os.path.join(ext_root, "extensions", "sd-webui-controlnet", "models"))
    settings = getattr(opts, "data", None) if opts is not None else None
    return WebUIHost(models_path, ckpt_dirs=ckpt, vae_dirs=vae, lora_dirs=lora, controlnet_dirs=cn,
                     output_dir=opt("sdtoolkit_output_dir"), settings=settings, progress_sink=progress_sink,
                     refreshers=refreshers, forge=forge, model_hooks=model_hooks,
                     webui_data_dir=getattr(paths, "data_path", None), device=opt("sdtoolkit_device"))


__all__ = [
    "MODEL_KINDS", "MODEL_EXTENSIONS", "WEBUI_SUBDIRS", "Host", "ModelHooks", "FolderHost", "StandaloneHost", "WebUIHost",
    "LocalHost",
    "webui_host_from", "default_models_dir", "natural_key",
]
