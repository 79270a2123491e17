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
}))
options_templates.update(options_section(("extra_networks", "Extra Networks", "sd"), {
    "extra_networks_default_multiplier": OptionInfo(1.0, "Default multiplier for extra networks"),
}))
opts = Options(options_templates, set())

sd_model = None
demo = None
state = types.SimpleNamespace(job="", job_count=0, job_no=0, sampling_step=0, sampling_steps=0, textinfo=None,
                              interrupted=False, skipped=False)
