"""Double of modules/sd_samplers_cfg_denoiser.py (A1111 1.10) CFGDenoiser, one prompt per image, no edit models:
cond rows first, then the uncond rows; ``cfg_denoiser_callback(CFGDenoiserParams(x_in, image_cond_in, sigma_in,
state.sampling_step, state.sampling_steps, text_cond, text_uncond, self))`` before the model call (reference
section 2); the inner model gets ``cond={"c_crossattn": [cond_in], "c_concat": [image_cond_in]}``; then
``cfg_denoised_callback``, the CFG combine and ``cfg_after_cfg_callback``. ``state.sampling_step`` is advanced by
the sampler's own step callback (``callback_state``), after the model call of that step.
"""
import torch

from modules import script_callbacks, shared


class CFGDenoiser(torch.nn.Module):
    def __init__(self, inner_model):
        super().__init__()
        self.inner_model = inner_model
        self.step = 0

    def combine_denoised(self, x_out, cond_scale, batch):
        denoised_uncond = x_out[-batch:]
        return denoised_uncond + (x_out[:batch] - denoised_uncond) * cond_scale

    def forward(self, x, sigma, uncond, cond, cond_scale, image_cond=None):
        state = shared.state
        batch = x.shape[0]
        if image_cond is None:
            image_cond = x.new_zeros(batch, 5, 1, 1)
        x_in = torch.cat([x, x])
        sigma_in = torch.cat([sigma, sigma])
        image_cond_in = torch.cat([image_cond, image_cond])
        params = script_callbacks.CFGDenoiserParams(x_in, image_cond_in, sigma_in, state.sampling_step,
                                                    state.sampling_steps, cond, uncond, self)
        script_callbacks.cfg_denoiser_callback(params)
        x_in, image_cond_in, sigma_in = params.x, params.image_cond, params.sigma
        cond, uncond = params.text_cond, params.text_uncond
        cond_in = torch.cat([cond, uncond])
        x_out = self.inner_model(x_in, sigma_in, cond={"c_crossattn": [cond_in], "c_concat": [image_cond_in]})
        denoised_params = script_callbacks.CFGDenoisedParams(x_out, state.sampling_step, state.sampling_steps,
                                                             self.inner_model)
        script_callbacks.cfg_denoised_callback(denoised_params)
        denoised = self.combine_denoised(denoised_params.x, cond_scale, batch)
        after = script_callbacks.AfterCFGCallbackParams(denoised, state.sampling_step, state.sampling_steps)
        script_callbacks.cfg_after_cfg_callback(after)
        self.step += 1
        return after.x
