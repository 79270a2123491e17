"""Double of modules/processing.py (A1111 1.10), only the order in which a generation runs scripts' hooks around
the VAE, which the tiled-VAE adapter depends on:

* ``process_images(p)``: ``p.scripts.before_process(p)``, then ``process_images_inner(p)`` inside ``try/finally``
  (the finally restores overridden settings; it does not call scripts);
* ``process_images_inner(p)``: ``p.scripts.process(p)``; (img2img: the init image is encoded in ``p.init``,
  called after ``process``); sampling; ``decode_latent_batch`` -> ``decode_first_stage(model, x)`` per sample;
  ``p.scripts.postprocess(p, processed)`` -- only reached when nothing raised;
* the callers (modules/txt2img.py, img2img.py, api/api.py) run everything in ``with closing(p):`` so
  ``p.close()`` runs even when the generation raises.
"""
import torch


class Processed:
    def __init__(self, p, images_list, info=""):
        self.images = images_list
        self.info = info


class StableDiffusionProcessing:
    def __init__(self, sd_model=None, scripts=None, script_args=(), width=512, height=512, batch_size=1):
        self.sd_model = sd_model
        self.scripts = scripts
        self.script_args = list(script_args)
        self.width, self.height, self.batch_size = width, height, batch_size
        self.extra_generation_params = {}
        self.sampler = None
        self.c = self.uc = None

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
    try:
        res = process_images_inner(p)
    finally:
        pass  # settings restore / token merging reset in the WebUI
    return res


def process_images_inner(p):
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
