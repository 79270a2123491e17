"""Double of modules/scripts.py (reference sections 1 and 2): Script, AlwaysVisible, load_scripts()."""
import os
import sys
from collections import namedtuple

from modules import errors, paths, script_callbacks, script_loading, scripts_postprocessing

AlwaysVisible = object()

ScriptFile = namedtuple("ScriptFile", ["basedir", "filename", "path"])
ScriptClassData = namedtuple("ScriptClassData", ["script_class", "path", "basedir", "module"])
scripts_data = []
postprocessing_scripts_data = []
current_basedir = paths.script_path
#: extension folders the double treats as active (the WebUI reads them from extensions.active())
extension_dirs = []


class Script:
    name = None
    section = None
    filename = None
    args_from = None
    args_to = None
    alwayson = False
    is_txt2img = False
    is_img2img = False
    tabname = None
    group = None
    create_group = True
    infotext_fields = None
    paste_field_names = None
    api_info = None
    setup_for_ui_only = False
    controls = None

    def title(self):
        raise NotImplementedError()

    def ui(self, is_img2img):
        pass

    def show(self, is_img2img):
        return True

    def run(self, p, *args):
        pass

    def setup(self, p, *args):
        pass

    def before_process(self, p, *args):
        pass

    def process(self, p, *args):
        pass

    def before_process_batch(self, p, *args, **kwargs):
        pass

    def after_extra_networks_activate(self, p, *args, **kwargs):
        pass

    def process_before_every_sampling(self, p, *args, **kwargs):
        pass

    def process_batch(self, p, *args, **kwargs):
        pass

    def postprocess_batch(self, p, *args, **kwargs):
        pass

    def postprocess_batch_list(self, p, pp, *args, **kwargs):
        pass

    def post_sample(self, p, ps, *args):
        pass

    def on_mask_blend(self, p, mba, *args):
        pass

    def postprocess_image(self, p, pp, *args):
        pass

    def postprocess_maskoverlay(self, p, ppmo, *args):
        pass

    def postprocess_image_after_composite(self, p, pp, *args):
        pass

    def postprocess(self, p, processed, *args):
        pass

    def before_hr(self, p, *args):
        pass

    def before_component(self, component, **kwargs):
        pass

    def after_component(self, component, **kwargs):
        pass

    def describe(self):
        return ""

    def elem_id(self, item_id):
        need_tabname = self.show(True) == self.show(False)
        tabkind = "img2img" if self.is_img2img else "txt2img"
        tabname = f"{tabkind}_" if need_tabname else ""
        title = "".join(c for c in self.title().lower().replace(" ", "_") if c.isalnum() or c == "_")
        return f"script_{tabname}{title}_{item_id}"


def list_scripts(scriptdirname, extension):
    scripts_list = []
    for ext_dir in extension_dirs:
        base = os.path.join(ext_dir, scriptdirname)
        if os.path.isdir(base):
            for filename in sorted(os.listdir(base)):
                scripts_list.append(ScriptFile(ext_dir, filename, os.path.join(base, filename)))
    return [x for x in scripts_list if os.path.splitext(x.path)[1].lower() == extension and os.path.isfile(x.path)]


def load_scripts():
    """Clear callbacks, then exec every scripts/*.py under its basename with its extension folder prepended to
    sys.path during the exec only; register every Script / ScriptPostprocessing subclass found in the module."""
    global current_basedir
    scripts_data.clear()
    postprocessing_scripts_data.clear()
    script_callbacks.clear_callbacks()
    scripts_list = list_scripts("scripts", ".py")
    syspath = sys.path

    def register_scripts_from_module(module, scriptfile):
        for script_class in module.__dict__.values():
            if type(script_class) != type:  # noqa: E721  (the WebUI's own check)
                continue
            if issubclass(script_class, Script):
                scripts_data.append(ScriptClassData(script_class, scriptfile.path, scriptfile.basedir, module))
            elif issubclass(script_class, scripts_postprocessing.ScriptPostprocessing):
                postprocessing_scripts_data.append(ScriptClassData(script_class, scriptfile.path, scriptfile.basedir, module))

    modules_loaded = []
    for scriptfile in scripts_list:
        try:
            if scriptfile.basedir != paths.script_path:
                sys.path = [scriptfile.basedir] + sys.path
            current_basedir = scriptfile.basedir
            script_module = script_loading.load_module(scriptfile.path)
            register_scripts_from_module(script_module, scriptfile)
            modules_loaded.append(script_module)
        except Exception as e:
            errors.display(e, f"Loading script: {scriptfile.filename}")
        finally:
            sys.path = syspath
            current_basedir = paths.script_path
    # as A1111 1.10: fresh runners for the txt2img / img2img tabs (their scripts are initialised by create_ui, or
    # by the API on its first request)
    global scripts_txt2img, scripts_img2img
    scripts_txt2img = ScriptRunner()
    scripts_img2img = ScriptRunner()
    return modules_loaded


def wrap_call(func, filename, funcname, *args, default=None, **kwargs):
    try:
        return func(*args, **kwargs)
    except Exception as e:
        errors.display(e, f"calling {filename}/{funcname}")
    return default


class ScriptRunner:
    """Double of modules/scripts.py ScriptRunner (A1111 1.10): one per tab; builds script UIs so each script's
    components land at ``inputs[args_from:args_to]`` (``inputs[0]`` is the selectable-script dropdown), and
    dispatches the processing hooks with ``p.script_args[args_from:args_to]``. Exceptions raised by a script's hook
    are reported and swallowed, as in the WebUI."""

    def __init__(self):
        self.scripts = []
        self.selectable_scripts = []
        self.alwayson_scripts = []
        self.titles = []
        self.title_map = {}
        self.inputs = [None]

    def initialize_scripts(self, is_img2img):
        self.scripts.clear()
        self.alwayson_scripts.clear()
        self.selectable_scripts.clear()
        for script_data in scripts_data:
            try:
                script = script_data.script_class()
            except Exception as e:
                errors.display(e, f"Error # failed to initialize Script {script_data.module}")
                continue
            script.filename = script_data.path
            script.is_txt2img = not is_img2img
            script.is_img2img = is_img2img
            script.tabname = "img2img" if is_img2img else "txt2img"
            visibility = script.show(script.is_img2img)
            if visibility == AlwaysVisible:
                self.scripts.append(script)
                self.alwayson_scripts.append(script)
                script.alwayson = True
            elif visibility:
                self.scripts.append(script)
                self.selectable_scripts.append(script)

    def create_script_ui(self, script):
        script.args_from = len(self.inputs)
        script.args_to = len(self.inputs)
        controls = wrap_call(script.ui, script.filename, "ui", script.is_img2img)
        script.controls = controls
        if controls is None:
            return
        script.name = wrap_call(script.title, script.filename, "title", default=script.filename).lower()
        self.inputs += controls
        script.args_to = len(self.inputs)

    def setup_ui_for_section(self, section, scriptlist=None):
        import gradio as gr

        if scriptlist is None:
            scriptlist = self.alwayson_scripts
        for script in scriptlist:
            if script.alwayson and script.section != section:
                continue
            if script.create_group:
                with gr.Group(visible=script.alwayson) as group:
                    self.create_script_ui(script)
                script.group = group
            else:
                self.create_script_ui(script)

    def setup_ui(self):
        import gradio as gr

        all_titles = [wrap_call(s.title, s.filename, "title") or s.filename for s in self.scripts]
        self.title_map = {title.lower(): s for title, s in zip(all_titles, self.scripts)}
        self.titles = [wrap_call(s.title, s.filename, "title") or f"{s.filename} [error]"
                       for s in self.selectable_scripts]
        self.setup_ui_for_section(None)
        dropdown = gr.Dropdown(label="Script", elem_id="script_list", choices=["None"] + self.titles, value="None",
                               type="index")
        self.inputs[0] = dropdown
        self.setup_ui_for_section(None, self.selectable_scripts)
        return self.inputs

    def run(self, p, *args):
        """The selectable script chosen by ``args[0]`` (1-based; 0 = none) runs with its own slice of the args."""
        script_index = args[0]
        if script_index == 0 or script_index is None:
            return None
        script = self.selectable_scripts[script_index - 1]
        if script is None:
            return None
        script_args = args[script.args_from:script.args_to]
        return script.run(p, *script_args)

    def _dispatch(self, name, p, *extra, **kwargs):
        for script in self.alwayson_scripts:
            try:
                script_args = p.script_args[script.args_from:script.args_to]
                getattr(script, name)(p, *extra, *script_args, **kwargs)
            except Exception as e:
                errors.display(e, f"Error running {name}: {script.filename}")

    def before_process(self, p):
        self._dispatch("before_process", p)

    def process(self, p):
        self._dispatch("process", p)

    def before_process_batch(self, p, **kwargs):
        self._dispatch("before_process_batch", p, **kwargs)

    def process_batch(self, p, **kwargs):
        self._dispatch("process_batch", p, **kwargs)

    def after_extra_networks_activate(self, p, **kwargs):
        self._dispatch("after_extra_networks_activate", p, **kwargs)

    def postprocess_batch(self, p, images, **kwargs):
        self._dispatch("postprocess_batch", p, *(), images=images, **kwargs)

    def process_before_every_sampling(self, p, **kwargs):
        self._dispatch("process_before_every_sampling", p, **kwargs)

    def before_hr(self, p):
        self._dispatch("before_hr", p)

    def postprocess(self, p, processed):
        self._dispatch("postprocess", p, processed)


scripts_txt2img = None
scripts_img2img = None
