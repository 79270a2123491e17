"""WebUI adapter: keeps the name of an in-memory merge (Merge tab, "Merge into the loaded model") valid.

After such a merge the ``sd_model_checkpoint`` option names the merged model, as A1111 names any model it loaded,
and a checkpoint_info stand-in for it sits in the checkpoint list (scripts/sdtoolkit_webui_host.py). A refresh of
the checkpoint list (the WebUI's refresh button, ``/sdapi/v1/refresh-checkpoints``) rebuilds that list from the files
and drops the stand-in; the WebUI then runs ``reload_model_weights()`` at the start of every generation, which would
load a fallback checkpoint over the merge. This always-on script (no UI) registers the stand-in again in
``before_process``, which the WebUI calls just before that reload; and when other weights are loaded, the stand-in
leaves the list.
"""
import os

from modules import script_callbacks, scripts

from lib_sdtoolkit.plugins import load_file_module

_glue = load_file_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "sdtoolkit_webui_host.py"),
                         "sdtoolkit_webui_host")


class SdToolkitMergeNameScript(scripts.Script):
    def title(self):
        return "SD Toolkit in-memory merge name"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        return None

    def before_process(self, p, *args):
        model = getattr(p, "sd_model", None)
        if model is not None:
            _glue.keep_merge_title(model)


script_callbacks.on_model_loaded(_glue.on_model_loaded)
