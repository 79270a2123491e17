"""Double of extensions-builtin/Lora/scripts/lora_script.py (A1111 1.10): patches the torch modules at import
(``networks.originals = lora_patches.LoraPatches()``), names the model's modules on ``on_model_loaded``, undoes the
patches on ``on_script_unloaded``, registers in ``on_before_ui`` the "Lora" extra-networks page, the ``lora``
extra network and its alias ``lyco``, adds ``GET /sdapi/v1/loras`` / ``POST /sdapi/v1/refresh-loras`` in
``on_app_started``, and its settings (section Extra Networks) at import."""
import network  # noqa: F401
import networks
import lora_patches
import extra_networks_lora
import ui_extra_networks_lora
from modules import script_callbacks, ui_extra_networks, extra_networks, shared


def unload():
    networks.originals.undo()


def before_ui():
    ui_extra_networks.register_page(ui_extra_networks_lora.ExtraNetworksPageLora())
    networks.extra_network_lora = extra_networks_lora.ExtraNetworkLora()
    extra_networks.register_extra_network(networks.extra_network_lora)
    extra_networks.register_extra_network_alias(networks.extra_network_lora, "lyco")


networks.originals = lora_patches.LoraPatches()

script_callbacks.on_model_loaded(networks.assign_network_names_to_compvis_modules)
script_callbacks.on_script_unloaded(unload)
script_callbacks.on_before_ui(before_ui)

shared.options_templates.update(shared.options_section(("extra_networks", "Extra Networks"), {
    "sd_lora": shared.OptionInfo("None", "Add network to prompt"),
    "lora_preferred_name": shared.OptionInfo("Alias from file", "When adding to prompt, refer to Lora by"),
    "lora_add_hashes_to_infotext": shared.OptionInfo(True, "Add Lora hashes to infotext"),
    "lora_show_all": shared.OptionInfo(False, "Always show all networks on the Lora page"),
    "lora_in_memory_limit": shared.OptionInfo(0, "Number of Lora networks to keep cached in memory"),
    "lora_not_found_warning_console": shared.OptionInfo(False, "Lora not found warning in console"),
    "lora_not_found_gradio_warning": shared.OptionInfo(False, "Lora not found warning popup in webui"),
}))
shared.options_templates.update(shared.options_section(("compatibility", "Compatibility"), {
    "lora_functional": shared.OptionInfo(False, "Lora/Networks: use old method (not doubled)"),
}))


def create_lora_json(obj):
    return {"name": obj.name, "alias": obj.alias, "path": obj.filename, "metadata": obj.metadata}


def api_networks(_, app):
    @app.get("/sdapi/v1/loras")
    async def get_loras():
        return [create_lora_json(obj) for obj in networks.available_networks.values()]

    @app.post("/sdapi/v1/refresh-loras")
    async def refresh_loras():
        return networks.list_available_networks()


script_callbacks.on_app_started(api_networks)
