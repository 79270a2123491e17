"""The ldm ControlNet network (the ``cldm`` module the ``ldm`` PyPI package does not ship), SD1.x / SD2.x.

Built from ldm's own blocks (``ResBlock``, ``SpatialTransformer``, ``Downsample``, ``TimestepEmbedSequential``) with
the exact key names of ControlNet ``.pth`` / ``.safetensors`` files after the ``control_model.`` prefix:
``time_embed``, ``input_hint_block``, ``input_blocks`` (a copy of the UNet's encoder), ``zero_convs``,
``middle_block``, ``middle_block_out`` (and ``label_emb`` for class-conditioned configs).

``forward(x, hint, timesteps, context, y=None)`` returns the 13 control residuals (12 zero-conv outputs, then the
middle block output) for the standard layout.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence

import torch
from torch import nn


def _ldm():
    from ldm.modules.attention import SpatialTransformer
    from ldm.modules.diffusionmodules.openaimodel import Downsample, ResBlock, TimestepEmbedSequential
    from ldm.modules.diffusionmodules.util import conv_nd, linear, timestep_embedding, zero_module

    return SpatialTransformer, Downsample, ResBlock, TimestepEmbedSequential, conv_nd, linear, timestep_embedding, \
        zero_module


class ControlNet(nn.Module):
    """ControlNet with ldm key names. Arguments follow ldm ``UNetModel`` (minus the decoder ones) plus
    ``hint_channels`` (3 for RGB hints) and ``global_average_pooling`` (shuffle models)."""

    def __init__(self, in_channels: int, model_channels: int, hint_channels: int, num_res_blocks: int,
                 attention_resolutions: Sequence[int], channel_mult: Sequence[int] = (1, 2, 4, 4),
                 num_heads: int = -1, num_head_channels: int = -1, transformer_depth: int = 1,
                 context_dim: Optional[int] = None, use_linear_in_transformer: bool = False,
                 num_classes: Any = None, adm_in_channels: Optional[int] = None, legacy: bool = False,
                 use_checkpoint: bool = False, dims: int = 2, conv_resample: bool = True,
                 global_average_pooling: bool = False, **_ignored: Any) -> None:
        super().__init__()
        (SpatialTransformer, Downsample, ResBlock, TES, conv_nd, linear, timestep_embedding,
         zero_module) = _ldm()
        self._timestep_embedding = timestep_embedding
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("either num_heads or num_head_channels must be set")
        self.model_channels = model_channels
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.global_average_pooling = global_average_pooling
        ted = model_channels * 4
        self.time_embed = nn.Sequential(linear(model_channels, ted), nn.SiLU(), linear(ted, ted))
        if num_classes == "sequential":
            self.label_emb = nn.Sequential(nn.Sequential(linear(adm_in_channels, ted), nn.SiLU(), linear(ted, ted)))
        elif isinstance(num_classes, int):
            self.label_emb = nn.Embedding(num_classes, ted)

        self.input_hint_block = TES(
            conv_nd(dims, hint_channels, 16, 3, padding=1), nn.SiLU(),
            conv_nd(dims, 16, 16, 3, padding=1), nn.SiLU(),
            conv_nd(dims, 16, 32, 3, padding=1, stride=2), nn.SiLU(),
            conv_nd(dims, 32, 32, 3, padding=1), nn.SiLU(),
            conv_nd(dims, 32, 96, 3, padding=1, stride=2), nn.SiLU(),
            conv_nd(dims, 96, 96, 3, padding=1), nn.SiLU(),
            conv_nd(dims, 96, 256, 3, padding=1, stride=2), nn.SiLU(),
            zero_module(conv_nd(dims, 256, model_channels, 3, padding=1)),
        )

        def zero_conv(ch: int) -> nn.Module:
            return TES(zero_module(conv_nd(dims, ch, ch, 1, padding=0)))

        def attention(ch: int) -> nn.Module:
            if num_head_channels == -1:
                heads, dim_head = num_heads, ch // num_heads
            else:
                heads, dim_head = ch // num_head_channels, num_head_channels
            if legacy:
                dim_head = ch // heads
            return SpatialTransformer(ch, heads, dim_head, depth=transformer_depth, context_dim=context_dim,
                                      use_linear=use_linear_in_transformer, use_checkpoint=use_checkpoint)

        self.input_blocks = nn.ModuleList([TES(conv_nd(dims, in_channels, model_channels, 3, padding=1))])
        self.zero_convs = nn.ModuleList([zero_conv(model_channels)])
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: List[nn.Module] = [ResBlock(ch, ted, 0.0, out_channels=mult * model_channels, dims=dims,
                                                    use_checkpoint=use_checkpoint)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attention(ch))
                self.input_blocks.append(TES(*layers))
                self.zero_convs.append(zero_conv(ch))
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TES(Downsample(ch, conv_resample, dims=dims, out_channels=ch)))
                self.zero_convs.append(zero_conv(ch))
                ds *= 2
        self.middle_block = TES(
            ResBlock(ch, ted, 0.0, dims=dims, use_checkpoint=use_checkpoint),
            attention(ch),
            ResBlock(ch, ted, 0.0, dims=dims, use_checkpoint=use_checkpoint),
        )
        self.middle_block_out = zero_conv(ch)

    @property
    def num_outputs(self) -> int:
        return len(self.zero_convs) + 1

    def forward(self, x: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                y: Optional[torch.Tensor] = None, **kwargs: Any) -> List[torch.Tensor]:
        t_emb = self._timestep_embedding(timesteps, self.model_channels, repeat_only=False).to(x.dtype)
        emb = self.time_embed(t_emb)
        if self.num_classes is not None:
            if y is None:
                raise ValueError("this ControlNet is class/ADM-conditioned and needs y")
            emb = emb + self.label_emb(y)
        guided_hint = self.input_hint_block(hint, emb, context)
        outs: List[torch.Tensor] = []
        h = x
        for i, (module, zc) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = module(h, emb, context)
            if i == 0:
                h = h + guided_hint
            outs.append(zc(h, emb, context))
        h = self.middle_block(h, emb, context)
        outs.append(self.middle_block_out(h, emb, context))
        if self.global_average_pooling:
            outs = [o.mean(dim=(2, 3), keepdim=True) for o in outs]
        return outs


__all__ = ["ControlNet"]
