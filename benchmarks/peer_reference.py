"""gon-pytorch 0.1.1 (kklemon/gon-pytorch, the maintained GON package) as a reference for gonjax's variants.

The package's own classes do the work: `GON` (N latent updates, learned origin, its inner and outer BCE),
`ImplicitDecoder` with `SirenBlockFactory`, `GaussianFourierFeatureTransform`, `NeRFPositionalEncoding` and the
modulation network. This module builds them from a gonjax `Config`, runs one training step the way the package
is meant to be used, and ports weights, buffers and gradients into gonjax's flax layout (as
`benchmarks/torch_reference.py` does for the spec's models). The conv GON's peer is the package's `GON` around
the spec's conv decoder (`torch_reference.ConvDecoder`), which the package does not have.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

import gon_pytorch

from benchmarks import torch_reference as tr
from gonjax.config import Config


class ConvLatentDecoder(nn.Module):
    """The spec's conv decoder behind the package's decoder interface: `forward(coords, latent)` (coords unused),
    `latent_dim`."""

    def __init__(self, decoder: tr.ConvDecoder, latent_dim: int):
        super().__init__()
        self.decoder, self.latent_dim = decoder, latent_dim

    def forward(self, coords, latent):
        del coords
        return self.decoder(latent)


def implicit_decoder(config: Config, nc: int, hidden: int = 256, depth: int = 4) -> gon_pytorch.ImplicitDecoder:
    """The package's SIREN decoder matching gonjax's `zoo.siren_for(config, nc)`: `depth` sine layers of width
    `hidden` and a linear output layer, w0 = 30, the config's position encoding and modulation; a sigmoid on the
    output with the package's BCE losses (config.loss "peer_bce"), none with the spec's."""
    if config.position_encoding == "fourier":
        encoder = gon_pytorch.GaussianFourierFeatureTransform(2, config.fourier_features, config.fourier_sigma)
    elif config.position_encoding == "nerf":
        encoder = gon_pytorch.NeRFPositionalEncoding(2, config.nerf_frequencies)
    else:
        encoder = gon_pytorch.IdentityPositionalEncoding(2)
    return gon_pytorch.ImplicitDecoder(
        latent_dim=config.nz, out_dim=nc, hidden_dim=hidden, num_layers=depth + 1,
        block_factory=gon_pytorch.SirenBlockFactory(nn.Linear, w0=30), pos_encoder=encoder,
        modulation=config.modulation, final_activation=torch.sigmoid if config.loss == "peer_bce" else None)


def peer_gon(decoder: nn.Module, config: Config) -> gon_pytorch.GON:
    """The package's GON around `decoder`, with the config's number of latent updates and learned origin."""
    return gon_pytorch.GON(decoder, latent_updates=config.latent_updates, learn_origin=config.learn_origin)


def peer_model(config: Config, nc: int) -> gon_pytorch.GON:
    """The package's GON matching gonjax's model for `config`: around the spec's conv decoder (the GON) or
    around its own SIREN decoder (`implicit_decoder`, the Implicit GON)."""
    if config.model == "gon":
        decoder = ConvLatentDecoder(tr.ConvDecoder(nz=config.nz, ngf=config.ngf, nc=nc), config.nz)
    else:
        decoder = implicit_decoder(config, nc)
    return peer_gon(decoder, config)


def coordinate_input(n: int, size: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """The package's coordinate input for n images of size x size: (n, size, size, 2), gonjax's grid
    (`models.coordinate_grid`: row-major, coordinate 0 = row) in every image."""
    grid = tr.coordinate_grid(size, dtype).to(device).reshape(1, size, size, 2)
    return grid.expand(n, size, size, 2).contiguous()


@dataclasses.dataclass
class PeerStep:
    """One training step of the package's GON; gradients stay in the parameters' `.grad`."""

    loss: torch.Tensor
    inner_loss: torch.Tensor  # the package reports the inner loss of the last update
    latent: torch.Tensor
    output: torch.Tensor


def peer_train_step(gon: gon_pytorch.GON, optimizer, coords, target) -> PeerStep:
    """infer_latents (N updates through the graph) -> decode -> the package's outer loss -> backward -> Adam."""
    latent, inner = gon.infer_latents(coords, target)
    output = gon(coords, latent)
    loss = gon.loss_outer(output, target)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return PeerStep(loss.detach(), inner.detach(), latent.detach(), output.detach())


def _linear(layer: nn.Linear, tensor) -> dict:
    return {"kernel": np.ascontiguousarray(tr._numpy(tensor(layer.weight)).T), "bias": tr._numpy(tensor(layer.bias))}


def _implicit_params(decoder: gon_pytorch.ImplicitDecoder, tensor) -> dict:
    """gonjax `Siren` params from the package's decoder. The package feeds [latent, coordinates] to its first
    layer; gonjax's first kernel has the coordinate rows first."""
    blocks = [block[0].linear for block in decoder.net.blocks]
    params = {f"hidden{i + 1}": _linear(layer, tensor) for i, layer in enumerate(blocks[:-1])}
    params["out"] = _linear(blocks[-1], tensor)
    if decoder.mod_network is None:
        kernel = params["hidden1"]["kernel"]
        params["hidden1"]["kernel"] = np.concatenate([kernel[decoder.latent_dim:], kernel[:decoder.latent_dim]])
    else:
        params["modulation"] = {f"layer{i + 1}": _linear(block[0], tensor)
                                for i, block in enumerate(decoder.mod_network.blocks)}
    return params


def _params(gon: gon_pytorch.GON, tensor) -> tuple[dict, dict]:
    decoder = gon.decoder
    if isinstance(decoder, ConvLatentDecoder):
        params, state = tr._tree(decoder.decoder, tensor)
    else:
        params, state = _implicit_params(decoder, tensor), {}
        if isinstance(decoder.pos_encoder, gon_pytorch.GaussianFourierFeatureTransform):
            state = {"fourier": {"projection": tr._numpy(decoder.pos_encoder.proj_matrix)}}
    if isinstance(gon.init_latent, nn.Parameter):
        params["latent_origin"] = tr._numpy(tensor(gon.init_latent))[0]
    return params, state


def flax_variables(gon: gon_pytorch.GON) -> dict:
    """{'params', 'batch_stats'} of the matching gonjax model: decoder weights, the learned origin
    (params['latent_origin']), BN running statistics or the Fourier projection."""
    params, state = _params(gon, lambda p: p)
    return {"params": params, "batch_stats": state}


def flax_grads(gon: gon_pytorch.GON) -> dict:
    """The gradients the last backward left in `.grad`, in the flax params layout."""
    return _params(gon, lambda p: p.grad)[0]
