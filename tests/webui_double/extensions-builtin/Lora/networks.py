"""Double of extensions-builtin/Lora/networks.py (A1111 1.10), written from the reference facts (a1111-platform.md
section 3), not from its code. What matters for the extensions that live beside it is its weight-merging mechanics:

* ``assign_network_names_to_compvis_modules(sd_model)`` names every module of the text encoder
  (``cond_stage_model.wrapped``; SDXL: ``<i>_`` + ``conditioner.embedders[i].wrapped``) and of ``sd_model.model``
  by its dotted name with ``.`` -> ``_`` (``module.network_layer_name``);
* ``load_networks(names, te, unet, dyn)`` fills ``loaded_networks``; names it cannot find are reported as
  ``Lora not found: a, b`` in ``sd_hijack.model_hijack.comments`` (console / gradio warning per settings);
* weights are merged LAZILY, at each module's forward (the patched ``forward`` of Linear/Conv2d/GroupNorm/LayerNorm/
  MultiheadAttention calls ``network_apply_weights(self)`` first): the first time a module is asked to hold a
  non-empty set, a CPU copy of its weight and bias is kept (``network_weights_backup`` / ``network_bias_backup``;
  MHA: ``(in_proj_weight, out_proj.weight)`` and ``out_proj.bias``); whenever the wanted set
  (``(name, te, unet, dyn)`` of each loaded network) differs from ``network_current_names``, the weights are
  restored from that backup (in place, ``copy_``) and each network's ΔW is added (``weight.copy_(weight +
  updown)``). With no network wanted a module that has a backup is restored from it at its next forward;
* the patched ``_load_from_state_dict`` drops the backup and the current names (``network_reset_cached_weight``).
"""
import logging
import os
import re

import torch

import network
from modules import errors, sd_hijack, shared

module_types = [network.ModuleTypeLora()]

re_digits = re.compile(r"\d+")
re_x_proj = re.compile(r"(.*)_([qkv]_proj)$")
suffix_conversion = {"attentions": {}, "resnets": {"conv1": "in_layers_2", "conv2": "out_layers_3",
                                                   "norm1": "in_layers_0", "norm2": "out_layers_0",
                                                   "time_emb_proj": "emb_layers_1",
                                                   "conv_shortcut": "skip_connection"}}


def convert_diffusers_name_to_compvis(key, is_sd2):
    def match(m, regex):
        r = re.match(regex, key)
        if not r:
            return False
        m.clear()
        m.extend(int(x) if re.match(re_digits, x) else x for x in r.groups())
        return True

    m = []
    if match(m, r"lora_unet_conv_in(.*)"):
        return f"diffusion_model_input_blocks_0_0{m[0]}"
    if match(m, r"lora_unet_conv_out(.*)"):
        return f"diffusion_model_out_2{m[0]}"
    if match(m, r"lora_unet_time_embedding_linear_(\d+)(.*)"):
        return f"diffusion_model_time_embed_{m[0] * 2 - 2}{m[1]}"
    if match(m, r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"):
        suffix = suffix_conversion.get(m[1], {}).get(m[3], m[3])
        return f"diffusion_model_input_blocks_{1 + m[0] * 3 + m[2]}_{1 if m[1] == 'attentions' else 0}_{suffix}"
    if match(m, r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)"):
        suffix = suffix_conversion.get(m[0], {}).get(m[2], m[2])
        return f"diffusion_model_middle_block_{1 if m[0] == 'attentions' else m[1] * 2}_{suffix}"
    if match(m, r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"):
        suffix = suffix_conversion.get(m[1], {}).get(m[3], m[3])
        return f"diffusion_model_output_blocks_{m[0] * 3 + m[2]}_{1 if m[1] == 'attentions' else 0}_{suffix}"
    if match(m, r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv"):
        return f"diffusion_model_input_blocks_{3 + m[0] * 3}_0_op"
    if match(m, r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv"):
        return f"diffusion_model_output_blocks_{2 + m[0] * 3}_{2 if m[0] > 0 else 1}_conv"
    if match(m, r"lora_te_text_model_encoder_layers_(\d+)_(.+)"):
        if is_sd2:
            rest = m[1].replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")
            return f"model_transformer_resblocks_{m[0]}_{rest}"
        return f"transformer_text_model_encoder_layers_{m[0]}_{m[1]}"
    if match(m, r"lora_te2_text_model_encoder_layers_(\d+)_(.+)"):
        rest = m[1].replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")
        return f"1_model_transformer_resblocks_{m[0]}_{rest}"
    return key


def assign_network_names_to_compvis_modules(sd_model):
    mapping = {}
    if getattr(sd_model, "is_sdxl", False):
        for i, embedder in enumerate(sd_model.conditioner.embedders):
            if not hasattr(embedder, "wrapped"):
                continue
            for name, module in embedder.wrapped.named_modules():
                network_name = f'{i}_{name.replace(".", "_")}'
                mapping[network_name] = module
                module.network_layer_name = network_name
    else:
        cond = getattr(sd_model.cond_stage_model, "wrapped", sd_model.cond_stage_model)
        for name, module in cond.named_modules():
            network_name = name.replace(".", "_")
            mapping[network_name] = module
            module.network_layer_name = network_name
    for name, module in sd_model.model.named_modules():
        network_name = name.replace(".", "_")
        mapping[network_name] = module
        module.network_layer_name = network_name
    sd_model.network_layer_mapping = mapping


def load_network(name, network_on_disk):
    net = network.Network(name, network_on_disk)
    net.mtime = os.path.getmtime(network_on_disk.filename)
    sd = network.read_state_dict(network_on_disk.filename)
    if not hasattr(shared.sd_model, "network_layer_mapping"):
        assign_network_names_to_compvis_modules(shared.sd_model)
    mapping = shared.sd_model.network_layer_mapping
    is_sd2 = "model_transformer_resblocks" in mapping
    matched = {}
    for key_network, weight in sd.items():
        base, _, part = key_network.partition(".")
        key = convert_diffusers_name_to_compvis(base, is_sd2)
        sd_module = mapping.get(key)
        if sd_module is None:
            m = re_x_proj.match(key)
            if m:
                sd_module = mapping.get(m.group(1))
        if sd_module is None and "lora_unet" in base:
            key = base.replace("lora_unet", "diffusion_model")
            sd_module = mapping.get(key)
        elif sd_module is None and "lora_te1_text_model" in base:
            key = base.replace("lora_te1_text_model", "0_transformer_text_model")
            sd_module = mapping.get(key)
            if sd_module is None:
                key = base.replace("lora_te1_text_model", "transformer_text_model")
                sd_module = mapping.get(key)
        if sd_module is None:
            continue
        if key not in matched:
            matched[key] = network.NetworkWeights(network_key=key_network, sd_key=key, w={}, sd_module=sd_module)
        matched[key].w[part] = weight
    for key, weights in matched.items():
        net_module = None
        for nettype in module_types:
            net_module = nettype.create_module(net, weights)
            if net_module is not None:
                break
        if net_module is None:
            raise AssertionError(f"Could not find a module type that would accept those keys: {', '.join(weights.w)}")
        net.modules[key] = net_module
    return net


def purge_networks_from_memory():
    while len(networks_in_memory) > shared.opts.lora_in_memory_limit and len(networks_in_memory) > 0:
        networks_in_memory.pop(next(iter(networks_in_memory)), None)


def load_networks(names, te_multipliers=None, unet_multipliers=None, dyn_dims=None):
    already_loaded = {net.name: net for net in loaded_networks if net.name in names}
    loaded_networks.clear()
    networks_on_disk = [available_network_aliases.get(name) for name in names]
    if any(x is None for x in networks_on_disk):
        list_available_networks()
        networks_on_disk = [available_network_aliases.get(name) for name in names]
    failed_to_load_networks = []
    for i, (network_on_disk, name) in enumerate(zip(networks_on_disk, names)):
        net = already_loaded.get(name, None)
        if network_on_disk is not None:
            if net is None:
                net = networks_in_memory.get(name)
            if net is None or os.path.getmtime(network_on_disk.filename) > net.mtime:
                try:
                    net = load_network(name, network_on_disk)
                    networks_in_memory.pop(name, None)
                    networks_in_memory[name] = net
                except Exception as e:
                    errors.display(e, f"loading network {network_on_disk.filename}")
                    continue
            net.mentioned_name = name
            network_on_disk.read_hash()
        if net is None:
            failed_to_load_networks.append(name)
            logging.info(f"Couldn't find network with name {name}")
            continue
        net.te_multiplier = te_multipliers[i] if te_multipliers else 1.0
        net.unet_multiplier = unet_multipliers[i] if unet_multipliers else 1.0
        net.dyn_dim = dyn_dims[i] if dyn_dims else 1.0
        loaded_networks.append(net)
    if failed_to_load_networks:
        lora_not_found_message = f'Lora not found: {", ".join(failed_to_load_networks)}'
        sd_hijack.model_hijack.comments.append(lora_not_found_message)
        if shared.opts.lora_not_found_warning_console:
            print(f"\n{lora_not_found_message}\n")
        if shared.opts.lora_not_found_gradio_warning:
            import gradio as gr
            gr.Warning(lora_not_found_message)
    purge_networks_from_memory()


def store_weights_backup(weight):
    if weight is None:
        return None
    return weight.to(torch.device("cpu"), copy=True)


def restore_weights_backup(obj, field, weight):
    if weight is None:
        setattr(obj, field, None)
        return
    getattr(obj, field).copy_(weight)


def network_restore_weights_from_backup(self):
    weights_backup = getattr(self, "network_weights_backup", None)
    bias_backup = getattr(self, "network_bias_backup", None)
    if weights_backup is None and bias_backup is None:
        return
    if weights_backup is not None:
        if isinstance(self, torch.nn.MultiheadAttention):
            restore_weights_backup(self, "in_proj_weight", weights_backup[0])
            restore_weights_backup(self.out_proj, "weight", weights_backup[1])
        else:
            restore_weights_backup(self, "weight", weights_backup)
    if isinstance(self, torch.nn.MultiheadAttention):
        restore_weights_backup(self.out_proj, "bias", bias_backup)
    else:
        restore_weights_backup(self, "bias", bias_backup)


def network_apply_weights(self):
    network_layer_name = getattr(self, "network_layer_name", None)
    if network_layer_name is None:
        return
    current_names = getattr(self, "network_current_names", ())
    wanted_names = tuple((x.name, x.te_multiplier, x.unet_multiplier, x.dyn_dim) for x in loaded_networks)
    weights_backup = getattr(self, "network_weights_backup", None)
    if weights_backup is None and wanted_names != ():
        if current_names != ():
            raise RuntimeError(f"{network_layer_name} - no backup weights found and current weights are not unchanged")
        if isinstance(self, torch.nn.MultiheadAttention):
            weights_backup = (store_weights_backup(self.in_proj_weight), store_weights_backup(self.out_proj.weight))
        else:
            weights_backup = store_weights_backup(self.weight)
        self.network_weights_backup = weights_backup
    bias_backup = getattr(self, "network_bias_backup", None)
    if bias_backup is None and wanted_names != ():
        if isinstance(self, torch.nn.MultiheadAttention) and self.out_proj.bias is not None:
            bias_backup = store_weights_backup(self.out_proj.bias)
        elif getattr(self, "bias", None) is not None:
            bias_backup = store_weights_backup(self.bias)
        self.network_bias_backup = bias_backup
    if current_names != wanted_names:
        network_restore_weights_from_backup(self)
        for net in loaded_networks:
            module = net.modules.get(network_layer_name, None)
            if module is not None and hasattr(self, "weight"):
                with torch.no_grad():
                    updown, _ = module.calc_updown(self.weight)
                    self.weight.copy_((self.weight.to(dtype=updown.dtype) + updown).to(dtype=self.weight.dtype))
                continue
            mq, mk, mv, mo = (net.modules.get(network_layer_name + s) for s in ("_q_proj", "_k_proj", "_v_proj",
                                                                                "_out_proj"))
            if isinstance(self, torch.nn.MultiheadAttention) and mq and mk and mv and mo:
                with torch.no_grad():
                    qw, kw, vw = self.in_proj_weight.chunk(3, 0)
                    qkv = torch.vstack([mq.calc_updown(qw)[0], mk.calc_updown(kw)[0], mv.calc_updown(vw)[0]])
                    self.in_proj_weight += qkv
                    self.out_proj.weight += mo.calc_updown(self.out_proj.weight)[0]
                continue
            if module is None:
                continue
            extra_network_lora.errors[net.name] = extra_network_lora.errors.get(net.name, 0) + 1
        self.network_current_names = wanted_names


def network_reset_cached_weight(self):
    self.network_current_names = ()
    self.network_weights_backup = None
    self.network_bias_backup = None


def _forward(name):
    def forward(self, *args, **kwargs):
        network_apply_weights(self)
        return getattr(originals, f"{name}_forward")(self, *args, **kwargs)
    forward.__name__ = f"network_{name}_forward"
    return forward


def _load_state_dict(name):
    def load(self, *args, **kwargs):
        network_reset_cached_weight(self)
        return getattr(originals, f"{name}_load_state_dict")(self, *args, **kwargs)
    load.__name__ = f"network_{name}_load_state_dict"
    return load


network_Linear_forward = _forward("Linear")
network_Conv2d_forward = _forward("Conv2d")
network_GroupNorm_forward = _forward("GroupNorm")
network_LayerNorm_forward = _forward("LayerNorm")
network_MultiheadAttention_forward = _forward("MultiheadAttention")
network_Linear_load_state_dict = _load_state_dict("Linear")
network_Conv2d_load_state_dict = _load_state_dict("Conv2d")
network_GroupNorm_load_state_dict = _load_state_dict("GroupNorm")
network_LayerNorm_load_state_dict = _load_state_dict("LayerNorm")
network_MultiheadAttention_load_state_dict = _load_state_dict("MultiheadAttention")


def process_network_files():
    for d in (shared.cmd_opts.lora_dir, shared.cmd_opts.lyco_dir_backcompat):
        if not d or not os.path.isdir(d):
            continue
        for root, _, files in os.walk(d, followlinks=True):
            for fn in sorted(files):
                if os.path.splitext(fn)[1].lower() not in (".pt", ".ckpt", ".safetensors"):
                    continue
                filename = os.path.join(root, fn)
                name = os.path.splitext(os.path.basename(filename))[0]
                try:
                    entry = network.NetworkOnDisk(name, filename)
                except OSError:
                    errors.report(f"Failed to load network {name} from {filename}", exc_info=True)
                    continue
                available_networks[name] = entry
                if entry.alias in available_network_aliases:
                    forbidden_network_aliases[entry.alias.lower()] = 1
                available_network_aliases[name] = entry
                available_network_aliases[entry.alias] = entry


def list_available_networks():
    available_networks.clear()
    available_network_aliases.clear()
    forbidden_network_aliases.clear()
    available_network_hash_lookup.clear()
    forbidden_network_aliases.update({"none": 1, "Addams": 1})
    os.makedirs(shared.cmd_opts.lora_dir, exist_ok=True)
    process_network_files()


originals = None
extra_network_lora = None
available_networks = {}
available_network_aliases = {}
loaded_networks = []
networks_in_memory = {}
available_network_hash_lookup = {}
forbidden_network_aliases = {}

list_available_networks()
