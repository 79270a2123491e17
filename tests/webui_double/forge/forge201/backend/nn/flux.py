"""Forge 2.0.1 backend/nn/flux.py (double): ``IntegratedFluxTransformer2DModel``'s parameters, no forward.

Kept: the constructor's parameters (as ``IntegratedFluxTransformer2DModel(**unet_config)`` is called by Forge's loader
with huggingface_guess's Flux config: ``in_channels`` 16 (x4 packed), ``vec_in_dim``, ``context_in_dim``,
``hidden_size``, ``mlp_ratio``, ``num_heads``, ``depth`` 19, ``depth_single_blocks`` 38, ``axes_dim``, ``theta``,
``qkv_bias``, ``guidance_embed``) and the module tree, so ``named_parameters()`` gives BFL's names
(``double_blocks.N.img_attn.qkv.weight``, ``single_blocks.N.linear1.weight``, ``...norm.query_norm.scale``,
``final_layer.adaLN_modulation.1.weight``) and shapes, which is all a LoRA patcher sees. The forward pass is not part
of the double: tests run diffusers' ``FluxTransformer2DModel`` on the same weights as the reference.
"""
import torch
from torch import nn


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim, hidden_dim):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=True)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=True)


class RMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = None
        self.scale = nn.Parameter(torch.ones(dim))


class QKNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)


class SelfAttention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)


class Modulation(nn.Module):
    def __init__(self, dim, double):
        super().__init__()
        self.is_double = double
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=True)


def _mlp(hidden_size, mlp_hidden_dim):
    return nn.Sequential(nn.Linear(hidden_size, mlp_hidden_dim, bias=True), nn.GELU(approximate="tanh"),
                         nn.Linear(mlp_hidden_dim, hidden_size, bias=True))


class DoubleStreamBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, mlp_ratio, qkv_bias=False):
        super().__init__()
        mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        for side in ("img", "txt"):
            setattr(self, f"{side}_mod", Modulation(hidden_size, double=True))
            setattr(self, f"{side}_attn", SelfAttention(dim=hidden_size, num_heads=num_heads, qkv_bias=qkv_bias))
            setattr(self, f"{side}_mlp", _mlp(hidden_size, mlp_hidden_dim))


class SingleStreamBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, qk_scale=None):
        super().__init__()
        self.hidden_dim = hidden_size
        self.num_heads = num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.linear1 = nn.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)
        self.norm = QKNorm(hidden_size // num_heads)
        self.hidden_size = hidden_size
        self.modulation = Modulation(hidden_size, double=False)


class LastLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))


class IntegratedFluxTransformer2DModel(nn.Module):
    def __init__(self, in_channels: int, vec_in_dim: int, context_in_dim: int, hidden_size: int, mlp_ratio: float,
                 num_heads: int, depth: int, depth_single_blocks: int, axes_dim: list, theta: int, qkv_bias: bool,
                 guidance_embed: bool):
        super().__init__()
        self.guidance_embed = guidance_embed
        self.in_channels = in_channels * 4
        self.out_channels = self.in_channels
        if hidden_size % num_heads != 0 or sum(axes_dim) != hidden_size // num_heads:
            raise ValueError(f"hidden size {hidden_size}, {num_heads} heads and axes {axes_dim} do not fit")
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.img_in = nn.Linear(self.in_channels, hidden_size, bias=True)
        self.time_in = MLPEmbedder(in_dim=256, hidden_dim=hidden_size)
        self.vector_in = MLPEmbedder(vec_in_dim, hidden_size)
        self.guidance_in = MLPEmbedder(in_dim=256, hidden_dim=hidden_size) if guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(context_in_dim, hidden_size)
        self.double_blocks = nn.ModuleList([DoubleStreamBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio,
                                                              qkv_bias=qkv_bias) for _ in range(depth)])
        self.single_blocks = nn.ModuleList([SingleStreamBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio)
                                            for _ in range(depth_single_blocks)])
        self.final_layer = LastLayer(hidden_size, 1, self.out_channels)
