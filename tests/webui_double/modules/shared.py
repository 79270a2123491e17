"""Double of modules/shared.py + shared_init: cmd_opts, opts (whose data_labels IS options_templates), state."""
import types

from modules import cmd_args
from modules.options import OptionInfo, Options, options_section  # noqa: F401

parser = cmd_args.parser
cmd_opts = parser.parse_args([])

options_templates = {}
options_templates.update(options_section(("sd", "Stable Diffusion", "sd"), {
    "sd_model_checkpoint": OptionInfo(None, "Stable Diffusion checkpoint"),
    "sd_vae": OptionInfo("Automatic", "SD VAE"),
}))
options_templates.update(options_section(("saving-images", "Saving images/grids", "saving"), {
    "samples_format": OptionInfo("png", "File format for images"),
    # A1111 1.10 modules/shared_options.py (what modules/images.py image_grid / draw_grid_annotations read)
    "grid_prevent_empty_spots": OptionInfo(False, "Prevent empty spots in grid (when set to autodetect)"),
    "n_rows": OptionInfo(-1, "Grid row count; use -1 for autodetect and 0 for it to be same as batch size"),
    "font": OptionInfo("", "Font for image grids that have text"),
    "grid_text_active_color": OptionInfo("#000000", "Text color for image grids"),
    "grid_text_inactive_color": OptionInfo("#999999", "Inactive text color for image grids"),
    "grid_background_color": OptionInfo("#ffffff", "Background color for image grids"),
}))
options_templates.update(options_section(("extra_networks", "Extra Networks", "sd"), {
    "extra_networks_default_multiplier": OptionInfo(1.0, "Default multiplier for extra networks"),
}))
opts = Options(options_templates, set())

sd_model = None
demo = None
state = types.SimpleNamespace(job="", job_count=0, job_no=0, sampling_step=0, sampling_steps=0, textinfo=None,
                              interrupted=False, skipped=False)
