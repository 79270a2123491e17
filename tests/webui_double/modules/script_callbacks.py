"""Double of modules/script_callbacks.py (reference section 2). Callbacks are named
``<extension>/<file>/<category>[/<name>]``; exceptions in callbacks are reported and swallowed. Callbacks run in
registration order (scripts load built-in extensions first), except ``before_ui`` and ``script_unloaded``, which
the WebUI runs in reverse registration order (A1111 1.10 modules/script_callbacks.py). metadata.ini ordering and
``prioritized_callbacks_*`` are not doubled."""
import dataclasses
import os
import sys
from collections import namedtuple
from typing import Any, Optional

from modules import errors

ScriptCallback = namedtuple("ScriptCallback", ["script", "callback", "name"])


class ImageSaveParams:
    def __init__(self, image, p, filename, pnginfo):
        self.image, self.p, self.filename, self.pnginfo = image, p, filename, pnginfo


class CFGDenoiserParams:
    def __init__(self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond, denoiser=None):
        self.x, self.image_cond, self.sigma = x, image_cond, sigma
        self.sampling_step, self.total_sampling_steps = sampling_step, total_sampling_steps
        self.text_cond, self.text_uncond, self.denoiser = text_cond, text_uncond, denoiser


class CFGDenoisedParams:
    def __init__(self, x, sampling_step, total_sampling_steps, inner_model):
        self.x, self.sampling_step, self.total_sampling_steps, self.inner_model = x, sampling_step, total_sampling_steps, inner_model


class AfterCFGCallbackParams:
    def __init__(self, x, sampling_step, total_sampling_steps):
        self.x, self.sampling_step, self.total_sampling_steps = x, sampling_step, total_sampling_steps


class ImageGridLoopParams:
    def __init__(self, imgs, cols, rows):
        self.imgs = imgs
        self.cols = cols
        self.rows = rows


@dataclasses.dataclass
class ExtraNoiseParams:
    noise: Any
    x: Any
    xi: Any


CATEGORIES = ("app_started", "model_loaded", "ui_tabs", "ui_train_tabs", "ui_settings", "before_image_saved",
              "image_saved", "extra_noise", "cfg_denoiser", "cfg_denoised", "cfg_after_cfg", "before_component",
              "after_component", "image_grid", "infotext_pasted", "script_unloaded", "before_ui", "on_reload",
              "list_optimizers", "list_unets", "before_token_counter")
callback_map = {f"callbacks_{c}": [] for c in CATEGORIES}


def _extension_name(filename):
    """Canonical extension name = lowercased folder name above ``scripts/`` (``base`` for the WebUI's own)."""
    parent = os.path.dirname(os.path.abspath(filename))
    if os.path.basename(parent) == "scripts":
        return os.path.basename(os.path.dirname(parent)).lower()
    return "base"


def _caller_file():
    """The file of the nearest caller outside this module: what the real host takes from
    ``[x for x in inspect.stack() if x.filename != __file__][0].filename``. Walked over the frames' code objects
    here, because ``inspect.stack()`` looks up every frame's source file and module, which under pytest's deep
    stacks cost about 0.15 s per registered callback (half a minute over the suite)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename != __file__:
            return frame.f_code.co_filename
        frame = frame.f_back
    return "unknown file"


def add_callback(callbacks, fun, *, name=None, category="unknown", filename=None):
    if filename is None:
        filename = _caller_file()
    callback_name = f"{_extension_name(filename)}/{os.path.basename(filename)}/{category}"
    if name is not None:
        callback_name += f"/{name}"
    unique = callback_name
    for index in range(1000):
        if not any(x.name == unique for x in callbacks):
            break
        unique = f"{callback_name}-{index + 1}"
    callbacks.append(ScriptCallback(filename, fun, unique))


def clear_callbacks():
    for callback_list in callback_map.values():
        callback_list.clear()


def remove_current_script_callbacks():
    filename = _caller_file()
    for callback_list in callback_map.values():
        for cb in [cb for cb in callback_list if cb.script == filename]:
            callback_list.remove(cb)


def remove_callbacks_for_function(callback_func):
    for callback_list in callback_map.values():
        for cb in [cb for cb in callback_list if cb.callback == callback_func]:
            callback_list.remove(cb)


def report_exception(c, job):
    errors.report(f"Error executing callback {job} for {c.script}", exc_info=True)


def _run(category, *args, collect=False, reverse=False):
    res = []
    callbacks = callback_map[f"callbacks_{category}"]
    for c in (list(reversed(callbacks)) if reverse else list(callbacks)):
        try:
            out = c.callback(*args)
            if collect:
                res += out or []
        except Exception:
            report_exception(c, f"{category}_callback")
    return res


def app_started_callback(demo, app):
    _run("app_started", demo, app)


def model_loaded_callback(sd_model):
    _run("model_loaded", sd_model)


def ui_tabs_callback():
    return _run("ui_tabs", collect=True)


def ui_train_tabs_callback(params):
    _run("ui_train_tabs", params)


def ui_settings_callback():
    _run("ui_settings")


def before_ui_callback():
    # the WebUI runs these two in REVERSE registration order (``for c in reversed(ordered_callbacks(...))``): an
    # extension's before_ui runs before those of the built-in extensions loaded ahead of it
    _run("before_ui", reverse=True)


def script_unloaded_callback():
    _run("script_unloaded", reverse=True)


def before_reload_callback():
    _run("on_reload")


def before_image_saved_callback(params):
    _run("before_image_saved", params)


def image_saved_callback(params):
    _run("image_saved", params)


def cfg_denoiser_callback(params):
    _run("cfg_denoiser", params)


def cfg_denoised_callback(params):
    _run("cfg_denoised", params)


def cfg_after_cfg_callback(params):
    _run("cfg_after_cfg", params)


def extra_noise_callback(params):
    _run("extra_noise", params)


def image_grid_callback(params):
    return _run("image_grid", params)


def infotext_pasted_callback(infotext, params):
    _run("infotext_pasted", infotext, params)


def _adder(category):
    def add(callback, *, name: Optional[str] = None):
        add_callback(callback_map[f"callbacks_{category}"], callback, name=name, category=category)
    add.__name__ = f"on_{category}"
    return add


on_app_started = _adder("app_started")
on_model_loaded = _adder("model_loaded")
on_ui_tabs = _adder("ui_tabs")
on_ui_train_tabs = _adder("ui_train_tabs")
on_ui_settings = _adder("ui_settings")
on_before_image_saved = _adder("before_image_saved")
on_image_saved = _adder("image_saved")
on_extra_noise = _adder("extra_noise")
on_cfg_denoiser = _adder("cfg_denoiser")
on_cfg_denoised = _adder("cfg_denoised")
on_cfg_after_cfg = _adder("cfg_after_cfg")
on_before_component = _adder("before_component")
on_after_component = _adder("after_component")
on_image_grid = _adder("image_grid")
on_infotext_pasted = _adder("infotext_pasted")
on_script_unloaded = _adder("script_unloaded")
on_before_ui = _adder("before_ui")
on_before_reload = _adder("on_reload")
on_list_optimizers = _adder("list_optimizers")
on_list_unets = _adder("list_unets")
on_before_token_counter = _adder("before_token_counter")
