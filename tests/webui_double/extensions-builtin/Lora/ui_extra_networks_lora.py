"""Double of extensions-builtin/Lora/ui_extra_networks_lora.py (A1111 1.10): the "Lora" cards page; a card's
``prompt`` is a JS expression inserting ``<lora:ALIAS:preferred weight or opts.extra_networks_default_multiplier>``
plus the activation text. (The version filter of the real page is not doubled: every network is listed.)"""
import os

import networks
from modules import shared, ui_extra_networks
from modules.ui_extra_networks import quote_js


class ExtraNetworksPageLora(ui_extra_networks.ExtraNetworksPage):
    def __init__(self):
        super().__init__("Lora")
        self.allow_negative_prompt = True

    def refresh(self):
        networks.list_available_networks()

    def create_item(self, name, index=None, enable_filter=True):
        lora_on_disk = networks.available_networks.get(name)
        if lora_on_disk is None:
            return None
        path, ext = os.path.splitext(lora_on_disk.filename)
        alias = lora_on_disk.get_alias()
        search_terms = [self.search_terms_from_path(lora_on_disk.filename)]
        if lora_on_disk.hash:
            search_terms.append(lora_on_disk.hash)
        item = {
            "name": name,
            "filename": lora_on_disk.filename,
            "shorthash": lora_on_disk.shorthash,
            "preview": self.find_preview(path),
            "description": self.find_description(path),
            "search_terms": search_terms,
            "local_preview": f"{path}.{shared.opts.samples_format}",
            "metadata": lora_on_disk.metadata,
            "sort_keys": {"default": index, **self.get_sort_keys(lora_on_disk.filename)},
            "sd_version": lora_on_disk.sd_version.name,
        }
        self.read_user_metadata(item)
        activation_text = item["user_metadata"].get("activation text")
        preferred_weight = item["user_metadata"].get("preferred weight", 0.0)
        item["prompt"] = quote_js(f"<lora:{alias}:") + " + " + (
            str(preferred_weight) if preferred_weight else "opts.extra_networks_default_multiplier") + " + " + \
            quote_js(">")
        if activation_text:
            item["prompt"] += " + " + quote_js(" " + activation_text)
        item["negative_prompt"] = quote_js(item["user_metadata"].get("negative text", ""))
        return item

    def list_items(self):
        names = list(networks.available_networks)
        for index, name in enumerate(names):
            item = self.create_item(name, index)
            if item is not None:
                yield item

    def allowed_directories_for_previews(self):
        return [shared.cmd_opts.lora_dir, shared.cmd_opts.lyco_dir_backcompat]
