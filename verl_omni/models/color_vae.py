"""A tiny ``AutoencoderKL`` whose weights are set by hand: latents are 8x8-averaged colours, decoded exactly.

The random tiny VAE maps latents to colour noise, and training one to reproduce flat colours takes minutes on a CPU
(its GroupNorms remove each image's mean, so absolute colour must be re-learned as patterns across channels). This
one is written down instead, in the same diffusers class, so it loads and runs like any SD3 VAE:

- encoder: the mean latent is ``Q @ avgpool8(rgb)`` (``Q``: 4x3, orthonormal columns); log-variance -20;
- decoder: ``rgb = Q^T @ z`` upsampled 8x by nearest neighbour, i.e. ``decode(encode(x))`` is ``x`` averaged over
  8x8 blocks (exactly, up to float rounding) and every latent direction but one maps linearly to a colour.

How the blocks become that map: every ResNet and attention block adds a residual branch whose last layer is zero
(an identity), down/upsamplers average/copy each channel, and the only normalisations on the main path (the two
``conv_norm_out`` GroupNorms) see groups of four channels ``(s, -s, C, -C)`` with a large constant ``C``: the group
mean is exactly 0 and its variance ``(E[s^2] + C^2) / 2`` is ``C^2 / 2`` to a relative ``1e-6``, so the GroupNorm is
a fixed scale that its affine weight undoes. A bias of 50 keeps the following SiLU in its linear range, and the
output convolution takes ``(y(s) - y(-s)) / 2``, which cancels that bias.
"""

from __future__ import annotations

import torch

from verl_omni.models.tiny_sd3 import TINY_SD3_HEIGHT

CHANNELS = 16  # every block: four GroupNorm groups of four channels
NUM_GROUPS = 4
LATENT_CHANNELS = 4
_CONSTANT = 1000.0
_SILU_OFFSET = 50.0  # silu(x + 50) = x + 50 to float precision for x > -30 (outputs clamp at |x| > 1)
_LOGVAR = -20.0
# Q: orthonormal columns, so the decoder's Q^T inverts the encoder's Q on colours; (1, 1, 1, 1) / 2 is not decoded.
LATENT_FROM_RGB = 0.5 * torch.tensor([[1.0, 1.0, 1.0], [1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]])


def _signal(c: int) -> tuple[int, int]:
    """Channels of colour ``c`` (0..2) and of its negation; group ``c`` also holds +C and -C."""
    return 4 * c, 4 * c + 1


def _constants(c: int) -> tuple[int, int]:
    return 4 * c + 2, 4 * c + 3


@torch.no_grad()
def _identity_blocks(module: torch.nn.Module) -> None:
    """Zero the last layer of every residual branch (ResNet ``conv2``, attention ``to_out``): identities."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    for block in module.modules():
        if isinstance(block, ResnetBlock2D):
            if block.conv_shortcut is not None:
                raise ValueError("hand-set VAE needs equal channels in every block (no conv_shortcut)")
            block.conv2.weight.zero_()
            block.conv2.bias.zero_()
        elif isinstance(block, Attention):
            block.to_out[0].weight.zero_()
            block.to_out[0].bias.zero_()


@torch.no_grad()
def _norm_out(norm: torch.nn.GroupNorm, act_in_gain: float) -> None:
    """Undo the fixed scale of the ``(s, -s, C, -C)`` groups and shift into SiLU's linear range."""
    norm.weight.fill_(act_in_gain)
    norm.bias.fill_(_SILU_OFFSET)
    norm.weight[12:] = 0.0  # the fourth group carries nothing
    norm.bias[12:] = 0.0


@torch.no_grad()
def _set_encoder(encoder: torch.nn.Module) -> None:
    conv_in = encoder.conv_in
    conv_in.weight.zero_()
    conv_in.bias.zero_()
    for c in range(3):
        pos, neg = _signal(c)
        conv_in.weight[pos, c, 1, 1] = 1.0
        conv_in.weight[neg, c, 1, 1] = -1.0
        hi, lo = _constants(c)
        conv_in.bias[hi], conv_in.bias[lo] = _CONSTANT, -_CONSTANT
    _identity_blocks(encoder)
    for block in encoder.down_blocks:
        for down in block.downsamplers or []:
            # Downsample2D pads right/bottom by one and convolves 3x3 with stride 2: a 2x2 mean per channel.
            down.conv.weight.zero_()
            down.conv.bias.zero_()
            for ch in range(CHANNELS):
                down.conv.weight[ch, ch, :2, :2] = 0.25
    _norm_out(encoder.conv_norm_out, _CONSTANT / 2**0.5)
    conv_out = encoder.conv_out  # 16 -> 2 x 4: mean, log-variance
    conv_out.weight.zero_()
    conv_out.bias.zero_()
    for k in range(LATENT_CHANNELS):
        for c in range(3):
            pos, neg = _signal(c)
            conv_out.weight[k, pos, 1, 1] = 0.5 * LATENT_FROM_RGB[k, c]
            conv_out.weight[k, neg, 1, 1] = -0.5 * LATENT_FROM_RGB[k, c]
        conv_out.bias[LATENT_CHANNELS + k] = _LOGVAR


@torch.no_grad()
def _set_decoder(decoder: torch.nn.Module) -> None:
    conv_in = decoder.conv_in  # 4 -> 16
    conv_in.weight.zero_()
    conv_in.bias.zero_()
    for c in range(3):
        pos, neg = _signal(c)
        for k in range(LATENT_CHANNELS):
            conv_in.weight[pos, k, 1, 1] = LATENT_FROM_RGB[k, c]
            conv_in.weight[neg, k, 1, 1] = -LATENT_FROM_RGB[k, c]
        hi, lo = _constants(c)
        conv_in.bias[hi], conv_in.bias[lo] = _CONSTANT, -_CONSTANT
    _identity_blocks(decoder)
    for block in decoder.up_blocks:
        for up in block.upsamplers or []:
            up.conv.weight.zero_()  # nearest-neighbour x2 (in Upsample2D), then a per-channel identity
            up.conv.bias.zero_()
            for ch in range(CHANNELS):
                up.conv.weight[ch, ch, 1, 1] = 1.0
    _norm_out(decoder.conv_norm_out, _CONSTANT / 2**0.5)
    conv_out = decoder.conv_out  # 16 -> 3
    conv_out.weight.zero_()
    conv_out.bias.zero_()
    for c in range(3):
        pos, neg = _signal(c)
        conv_out.weight[c, pos, 1, 1] = 0.5
        conv_out.weight[c, neg, 1, 1] = -0.5


def encode_mean(images: torch.Tensor) -> torch.Tensor:
    """What the hand-set encoder computes (its posterior mean), in closed form: ``Q @ avgpool8(images)``.

    ``images`` in [-1, 1], ``(B, 3, H, W)``. Much faster than running the encoder's convolutions on a CPU (tested to
    match :func:`color_vae`'s ``encode``).
    """
    pooled = torch.nn.functional.avg_pool2d(images.float(), 8)
    return torch.einsum("kc,bchw->bkhw", LATENT_FROM_RGB, pooled)


def color_vae(sample_size: int = TINY_SD3_HEIGHT, shift_factor: float = 0.0, scaling_factor: float = 1.0):
    """The hand-set ``AutoencoderKL``: every weight is written here (none is random)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(CHANNELS,) * 4,  # four blocks: 8x downsampling, as in SD3
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=NUM_GROUPS,
        sample_size=sample_size,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    with torch.no_grad():
        for param in vae.parameters():  # residual branches end in zeros: their other weights are zero too
            param.zero_()
    _set_encoder(vae.encoder)
    _set_decoder(vae.decoder)
    return vae.eval().requires_grad_(False)
