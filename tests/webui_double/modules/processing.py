"""Double of modules/processing.py (A1111 1.10), only the order in which a generation runs scripts' hooks around
the VAE, which the tiled-VAE adapter depends on:

* ``process_images(p)``: ``p.scripts.before_process(p)``, then ``process_images_inner(p)`` inside ``try/finally``
  (the finally restores overridden settings; it does not call scripts);
* ``process_images_inner(p)``: ``p.scripts.process(p)``; (img2img: the init image is encoded in ``p.init``,
  called after ``process``); sampling; ``decode_latent_batch`` -> ``decode_first_stage(model, x)`` per sample;
  ``p.scripts.postprocess(p, processed)`` -- only reached when nothing raised;
* the callers (modules/txt2img.py, img2img.py, api/api.py) run everything in ``with closing(p):`` so
  ``p.close()`` runs even when the generation raises.

Extra networks (added for the LoRA adapter), per batch in ``process_images_inner`` as in A1111 1.10:
``p.prompts = p.all_prompts[...]``; ``p.scripts.before_process_batch``; ``p.parse_extra_network_prompts()``
(``extra_networks.parse_prompts``: tags stripped from the prompts, the first prompt's tags kept);
``extra_networks.activate(p, p.extra_network_data)`` unless ``p.disable_extra_networks``;
``p.scripts.process_batch``; ``p.setup_conds()`` (the text encoder runs on the stripped prompts:
``sd_model.get_learned_conditioning``, without the WebUI's prompt-schedule parsing and cache); sampling; decoding;
after the batch loop ``extra_networks.deactivate(p, p.extra_network_data)`` when there was any.
Comments: ``model_hijack.clear_comments()`` before the prompts are set up; after ``setup_conds`` every
``model_hijack.comments`` entry goes to ``p.comment(text)`` (``p.comments``), and ``Processed.comments`` joins them
one per line: what the UI shows under the image (``plaintext_to_html(processed.comments, classname="comments")``). Double only: a
generation built with ``prompt=None`` (the VAE-hook tests) skips the prompt/extra-network steps.
"""
import torch

from modules import extra_networks, sd_models, shared
from modules.sd_hijack import model_hijack


class Processed:
    # A1111 1.10's signature (seed and info positional after the images; infotexts one per image, default info)
    def __init__(self, p, images_list, seed=-1, info="", subseed=None, all_prompts=None, all_negative_prompts=None,
                 all_seeds=None, all_subseeds=None, index_of_first_image=0, infotexts=None, comments=""):
        self.images = images_list
        self.seed = seed
        self.info = info
        self.infotexts = infotexts or [info] * len(images_list)
        self.all_seeds = all_seeds or getattr(p, "all_seeds", None) or [seed]
        self.comments = "".join(f"{comment}\n" for comment in getattr(p, "comments", {}))
        self.extra_generation_params = dict(getattr(p, "extra_generation_params", {}) or {})

    def js(self):
        import json

        return json.dumps({"extra_generation_params": {k: str(v) for k, v in self.extra_generation_params.items()},
                           "sd_model_name": getattr(getattr(shared.sd_model, "sd_checkpoint_info", None),
                                                    "model_name", None)})


class StableDiffusionProcessing:
    def __init__(self, sd_model=None, scripts=None, script_args=(), width=512, height=512, batch_size=1,
                 prompt=None, negative_prompt="", seed=0, steps=20, disable_extra_networks=False):
        self.sd_model = sd_model
        self.scripts = scripts
        self.script_args = list(script_args)
        self.width, self.height, self.batch_size = width, height, batch_size
        self.extra_generation_params = {}
        self.sampler = None
        self.c = self.uc = None
        self.prompt, self.negative_prompt, self.seed, self.steps = prompt, negative_prompt, seed, steps
        self.disable_extra_networks = disable_extra_networks
        self.all_prompts = self.all_negative_prompts = self.all_seeds = self.all_subseeds = None
        self.prompts = self.negative_prompts = self.seeds = self.subseeds = None
        self.extra_network_data = None
        self.iteration = 0
        self.comments = {}
        self.override_settings = {}
        self.is_api = False

    def comment(self, text):
        self.comments[text] = 1

    def setup_prompts(self):
        self.all_prompts = [self.prompt] * self.batch_size
        self.all_negative_prompts = [self.negative_prompt] * self.batch_size
        self.all_seeds = [self.seed + i for i in range(self.batch_size)]
        self.all_subseeds = list(self.all_seeds)

    def parse_extra_network_prompts(self):
        self.prompts, self.extra_network_data = extra_networks.parse_prompts(self.prompts)

    def setup_conds(self):
        model = self.sd_model
        if hasattr(model, "get_learned_conditioning"):
            self.uc = model.get_learned_conditioning(self.negative_prompts)
            self.c = model.get_learned_conditioning(self.prompts)

    def init(self, all_prompts, all_seeds, all_subseeds):
        pass

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        raise NotImplementedError()

    def close(self):
        self.sampler = None
        self.c = None
        self.uc = None


class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    pass


def decode_first_stage(model, x):
    return model.decode_first_stage(x)


def decode_latent_batch(model, batch, target_device=None, check_for_nans=False):
    samples = []
    for i in range(batch.shape[0]):
        sample = decode_first_stage(model, batch[i:i + 1])[0]
        if target_device is not None:
            sample = sample.to(target_device)
        samples.append(sample)
    return samples


def process_images(p):
    if p.scripts is not None:
        p.scripts.before_process(p)
    # A1111: unless the request overrides it with a known checkpoint, (re)load the checkpoint the
    # sd_model_checkpoint option names (select_checkpoint; a same-file early return keeps the loaded weights).
    # Double only: skipped for bare test models that were never loaded through sd_models.load_model_weights.
    if getattr(shared.sd_model, "sd_model_checkpoint", None) is not None and sd_models.checkpoints_list:
        if sd_models.checkpoint_aliases.get(p.override_settings.get("sd_model_checkpoint")) is None:
            p.override_settings.pop("sd_model_checkpoint", None)
            sd_models.reload_model_weights()
    try:
        res = process_images_inner(p)
    finally:
        pass  # settings restore / token merging reset in the WebUI
    return res


def process_images_inner(p):
    if p.prompt is not None:
        return _process_images_inner_prompted(p)
    if p.scripts is not None:
        p.scripts.process(p)
    p.init([""], [0], [0])
    with torch.no_grad():
        samples = p.sample(None, None, [0], [0], 0, [""])
        decoded = decode_latent_batch(p.sd_model, samples, target_device="cpu")
    res = Processed(p, decoded)
    if p.scripts is not None:
        p.scripts.postprocess(p, res)
    return res


def _process_images_inner_prompted(p):
    model_hijack.clear_comments()
    p.setup_prompts()
    if p.scripts is not None:
        p.scripts.process(p)
    decoded = []
    with torch.no_grad():
        p.init(p.all_prompts, p.all_seeds, p.all_subseeds)
        for n in range(1):  # n_iter = 1
            p.iteration = n
            p.prompts = p.all_prompts[n * p.batch_size:(n + 1) * p.batch_size]
            p.negative_prompts = p.all_negative_prompts[n * p.batch_size:(n + 1) * p.batch_size]
            p.seeds = p.all_seeds[n * p.batch_size:(n + 1) * p.batch_size]
            p.subseeds = p.all_subseeds[n * p.batch_size:(n + 1) * p.batch_size]
            if p.scripts is not None:
                p.scripts.before_process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds, subseeds=p.subseeds)
            p.parse_extra_network_prompts()
            if not p.disable_extra_networks:
                extra_networks.activate(p, p.extra_network_data)
            if p.scripts is not None:
                p.scripts.process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds, subseeds=p.subseeds)
            p.setup_conds()
            p.extra_generation_params.update(model_hijack.extra_generation_params)
            for comment in model_hijack.comments:
                p.comment(comment)
            samples = p.sample(conditioning=p.c, unconditional_conditioning=p.uc, seeds=p.seeds, subseeds=p.subseeds,
                               subseed_strength=0, prompts=p.prompts)
            decoded += decode_latent_batch(p.sd_model, samples, target_device="cpu")
    if not p.disable_extra_networks and p.extra_network_data:
        extra_networks.deactivate(p, p.extra_network_data)
    res = Processed(p, decoded)
    if p.scripts is not None:
        p.scripts.postprocess(p, res)
    return res
