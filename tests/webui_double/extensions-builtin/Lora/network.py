"""Double of extensions-builtin/Lora/network.py + network_lora.py (A1111 1.10), written from the reference facts
(a1111-platform.md section 3): a network file on disk (name = file stem, alias = ``ss_output_name``, hash =
``sshs_model_hash`` or the addnet hash, shorthash = 12 hex digits, sd version from metadata), a loaded network, and
the LoRA module type (``lora_up.weight`` + ``lora_down.weight`` [+ ``alpha``]): ΔW = up @ down (dyn: first dyn
ranks), × scale (``scale`` key, else alpha / rank, else 1) × multiplier (te if ``'transformer'`` is in the first 20
characters of the layer's name, else unet). Other module types are not doubled (the double raises as the WebUI does
for a key set no type accepts)."""
import enum
import json
import os

import torch

from modules import cache, hashes, sd_models, shared


class SdVersion(enum.Enum):
    Unknown = 1
    SD1 = 2
    SD2 = 3
    SDXL = 4


def read_metadata(filename):
    """modules/sd_models.read_metadata_from_safetensors: the header's ``__metadata__``, values starting with ``{``
    decoded as JSON."""
    with open(filename, mode="rb") as file:
        n = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(n))
    res = {}
    for k, v in header.get("__metadata__", {}).items():
        res[k] = v
        if isinstance(v, str) and v[0:1] == "{":
            try:
                res[k] = json.loads(v)
            except Exception:
                pass
    return res


class NetworkOnDisk:
    def __init__(self, name, filename):
        self.name = name
        self.filename = filename
        self.metadata = {}
        self.is_safetensors = os.path.splitext(filename)[1].lower() == ".safetensors"
        if self.is_safetensors:
            try:
                self.metadata = cache.cached_data_for_file("safetensors-metadata", "lora/" + self.name, filename,
                                                           lambda: read_metadata(filename))
            except Exception as e:
                from modules import errors
                errors.display(e, f"reading lora {filename}")
        self.alias = self.metadata.get("ss_output_name", self.name)
        self.hash = None
        self.shorthash = None
        self.set_hash(self.metadata.get("sshs_model_hash") or
                      hashes.sha256_from_cache(self.filename, "lora/" + self.name,
                                               use_addnet_hash=self.is_safetensors) or "")
        self.sd_version = self.detect_version()

    def detect_version(self):
        if str(self.metadata.get("ss_base_model_version", "")).startswith("sdxl_"):
            return SdVersion.SDXL
        elif str(self.metadata.get("ss_v2", "")) == "True":
            return SdVersion.SD2
        elif len(self.metadata):
            return SdVersion.SD1
        return SdVersion.Unknown

    def set_hash(self, v):
        self.hash = v
        self.shorthash = self.hash[0:12]
        if self.shorthash:
            import networks
            networks.available_network_hash_lookup[self.shorthash] = self

    def read_hash(self):
        if not self.hash:
            self.set_hash(hashes.sha256(self.filename, "lora/" + self.name, use_addnet_hash=self.is_safetensors)
                          or "")

    def get_alias(self):
        import networks
        if shared.opts.lora_preferred_name == "Filename" or self.alias.lower() in networks.forbidden_network_aliases:
            return self.name
        return self.alias


class Network:  # LoraModule
    def __init__(self, name, network_on_disk):
        self.name = name
        self.network_on_disk = network_on_disk
        self.te_multiplier = 1.0
        self.unet_multiplier = 1.0
        self.dyn_dim = None
        self.modules = {}
        self.bundle_embeddings = {}
        self.mtime = None
        self.mentioned_name = None


class NetworkWeights:
    def __init__(self, network_key, sd_key, w, sd_module):
        self.network_key, self.sd_key, self.w, self.sd_module = network_key, sd_key, w, sd_module


class NetworkModuleLora:
    def __init__(self, net, weights):
        self.network = net
        self.network_key = weights.network_key
        self.sd_key = weights.sd_key
        self.sd_module = weights.sd_module
        self.up = weights.w["lora_up.weight"]
        self.down = weights.w["lora_down.weight"]
        self.dim = self.down.shape[0]
        self.alpha = float(weights.w["alpha"].item()) if "alpha" in weights.w else None
        self.scale = float(weights.w["scale"].item()) if "scale" in weights.w else None

    def multiplier(self):
        if "transformer" in self.sd_key[:20]:
            return self.network.te_multiplier
        return self.network.unet_multiplier

    def calc_scale(self):
        if self.scale is not None:
            return self.scale
        if self.dim is not None and self.alpha is not None:
            return self.alpha / self.dim
        return 1.0

    def calc_updown(self, orig_weight):
        up = self.up.to(orig_weight.device, dtype=torch.float32).reshape(self.up.shape[0], -1)
        down = self.down.to(orig_weight.device, dtype=torch.float32).reshape(self.down.shape[0], -1)
        dyn = self.network.dyn_dim
        if dyn:
            up, down = up[:, :dyn], down[:dyn, :]
        updown = (up @ down).reshape(orig_weight.shape)
        return updown * self.calc_scale() * self.multiplier(), None


class ModuleTypeLora:
    def create_module(self, net, weights):
        if all(x in weights.w for x in ["lora_up.weight", "lora_down.weight"]):
            return NetworkModuleLora(net, weights)
        return None


def read_state_dict(filename):
    return sd_models.read_state_dict(filename)
