"""Double of modules/api/api.py (A1111 1.10): how /sdapi/v1/txt2img and img2img turn a request's
``alwayson_scripts`` into the positional ``script_args`` a generation gives each script (reference section 2:
``"alwayson_scripts": {"<title lowercased>": {"args": [...]}}``, ``init_script_args``). Only the script-argument
plumbing; the HTTP layer and the request models are not doubled.
"""
from fastapi import HTTPException


def script_name_to_index(name, scripts):
    try:
        return [script.title().lower() for script in scripts].index(name.lower())
    except Exception as e:
        raise HTTPException(status_code=422, detail=f"Script '{name}' not found") from e


def get_script(script_name, script_runner):
    if script_name is None or script_name == "":
        return None, None
    script_idx = script_name_to_index(script_name, script_runner.scripts)
    return script_runner.scripts[script_idx]


def init_default_script_args(script_runner):
    """None everywhere except position 0; each script's slice holds the default values of the components its
    ``ui()`` returns (ui() is called again inside a gr.Blocks)."""
    import gradio as gr

    last_arg_index = 1
    for script in script_runner.scripts:
        if last_arg_index < script.args_to:
            last_arg_index = script.args_to
    script_args = [None] * last_arg_index
    script_args[0] = 0
    with gr.Blocks():
        for script in script_runner.scripts:
            if script.ui(script.is_img2img):
                ui_default_values = []
                for elem in script.ui(script.is_img2img):
                    ui_default_values.append(elem.value)
                script_args[script.args_from:script.args_to] = ui_default_values
    return script_args


def init_script_args(alwayson_scripts, default_script_args, selectable_scripts=None, selectable_idx=None,
                     script_runner=None, request_script_args=None):
    """The request's ``alwayson_scripts`` dict placed over the defaults at each script's args_from slots
    (at most ``args_to - args_from`` values per script)."""
    script_args = default_script_args.copy()
    if selectable_scripts:
        script_args[selectable_scripts.args_from:selectable_scripts.args_to] = request_script_args
        script_args[0] = selectable_idx + 1
    if alwayson_scripts:
        for alwayson_script_name in alwayson_scripts.keys():
            alwayson_script = get_script(alwayson_script_name, script_runner)
            if alwayson_script is None:
                raise HTTPException(status_code=422, detail=f"always on script {alwayson_script_name} not found")
            if alwayson_script.alwayson is False:
                raise HTTPException(status_code=422,
                                    detail="Cannot have a selectable script in the always on scripts params")
            if "args" in alwayson_scripts[alwayson_script_name]:
                args = alwayson_scripts[alwayson_script_name]["args"]
                for idx in range(0, min((alwayson_script.args_to - alwayson_script.args_from), len(args))):
                    script_args[alwayson_script.args_from + idx] = args[idx]
    return script_args
