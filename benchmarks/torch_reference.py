"""PyTorch reference of the GON models, written from GON-SPEC with the authors' semantics.

NCHW tensors, `torch.autograd.grad(..., create_graph=True)` for the latent, BatchNorm2d in training mode in every
pass (batch statistics; running averages updated, never used), `torch.optim.Adam`. Used by the parity tests
(float64) and by `benchmarks.step_time` (float32).

`flax_variables(decoder)` ports the PyTorch weights into gonjax's Flax layout (GON-SPEC 2.1), so both frameworks
can start from the very same parameters.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

ACTIVATIONS = {"elu": nn.ELU, "relu": nn.ReLU, "selu": nn.SELU}


class ConvDecoder(nn.Module):
    """GON-SPEC 2.1: latent (B, nz) -> image (B, nc, 32, 32)."""

    def __init__(self, nz: int = 256, ngf: int = 16, nc: int = 1, activation: str = "elu"):
        super().__init__()
        act = ACTIVATIONS[activation]
        self.net = nn.Sequential(
            nn.ConvTranspose2d(nz, 4 * ngf, 4, 1, 0), nn.BatchNorm2d(4 * ngf), act(),
            nn.ConvTranspose2d(4 * ngf, 2 * ngf, 4, 2, 1), nn.BatchNorm2d(2 * ngf), act(),
            nn.ConvTranspose2d(2 * ngf, ngf, 4, 2, 1), nn.BatchNorm2d(ngf), act(),
            nn.ConvTranspose2d(ngf, nc, 4, 2, 1), nn.Sigmoid(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.reshape(z.shape[0], -1, 1, 1))


# Flax module names of gonjax.models.ConvDecoder -> index in ConvDecoder.net
DECONVS = {"deconv1": 0, "deconv2": 3, "deconv3": 6, "deconv4": 9}
BATCH_NORMS = {"bn1": 1, "bn2": 4, "bn3": 7}


def gon_loss(reconstruction: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """GON-SPEC 4.1 in NCHW: squared error summed over channels, mean over batch and pixels."""
    return ((reconstruction - images) ** 2).sum(1).mean()


@dataclasses.dataclass
class GonStep:
    latent: torch.Tensor
    inner_loss: torch.Tensor
    outer_loss: torch.Tensor
    reconstruction: torch.Tensor
    grads: dict[str, torch.Tensor]  # parameter name -> gradient of the outer loss


def gon_forward(decoder: ConvDecoder, images: torch.Tensor, nz: int, detach: bool = False, train: bool = True):
    """The origin step of GON-SPEC 4.1 (4.2 with `detach`): latent, inner loss, outer loss, reconstruction.

    With `train`, the graph through the latent is kept (create_graph=True) so the outer loss can be
    back-propagated into the decoder; without, only the latent's own gradient is taken (evaluation).
    """
    z0 = torch.zeros(images.shape[0], nz, dtype=images.dtype, device=images.device, requires_grad=True)
    inner = gon_loss(decoder(z0), images)
    grad, = torch.autograd.grad(inner, [z0], create_graph=train and not detach)
    latent = -grad
    if detach or not train:
        latent = latent.detach()
    if train:
        reconstruction = decoder(latent)
    else:
        with torch.no_grad():
            reconstruction = decoder(latent)
    return latent, inner, gon_loss(reconstruction, images), reconstruction


def gon_train_step(decoder: ConvDecoder, optimizer: torch.optim.Optimizer, images: torch.Tensor, nz: int,
                   detach: bool = False) -> GonStep:
    """One training step: origin step, backward through the latent, Adam step."""
    latent, inner, outer, reconstruction = gon_forward(decoder, images, nz, detach)
    optimizer.zero_grad(set_to_none=True)
    outer.backward()
    grads = {name: p.grad.detach().clone() for name, p in decoder.named_parameters()}
    optimizer.step()
    return GonStep(latent.detach(), inner.detach(), outer.detach(), reconstruction.detach(), grads)


def make_adam(decoder: nn.Module, lr: float) -> torch.optim.Adam:
    """GON-SPEC 5: Adam, betas (0.9, 0.999), eps 1e-8, no weight decay."""
    return torch.optim.Adam(decoder.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().copy()  # a copy: .numpy() shares memory with tensors Adam updates in place


def deconv_kernel_to_flax(weight: np.ndarray) -> np.ndarray:
    """PyTorch ConvTranspose2d weight (Cin, Cout, kh, kw) -> flax ConvTranspose kernel (kh, kw, Cin, Cout) with
    `transpose_kernel=False`: the spatially flipped kernel (GON-SPEC 2.1)."""
    return np.ascontiguousarray(weight.transpose(2, 3, 0, 1)[::-1, ::-1])


def flax_variables(decoder: ConvDecoder) -> dict:
    """{'params', 'batch_stats'} of gonjax's ConvDecoder holding the PyTorch decoder's weights and BN buffers."""
    params, batch_stats = {}, {}
    for name, index in DECONVS.items():
        layer = decoder.net[index]
        params[name] = {"kernel": deconv_kernel_to_flax(_numpy(layer.weight)), "bias": _numpy(layer.bias)}
    for name, index in BATCH_NORMS.items():
        layer = decoder.net[index]
        params[name] = {"scale": _numpy(layer.weight), "bias": _numpy(layer.bias)}
        batch_stats[name] = {"mean": _numpy(layer.running_mean), "var": _numpy(layer.running_var)}
    return {"params": params, "batch_stats": batch_stats}


def flax_named(tensors: dict[str, torch.Tensor]) -> dict:
    """Per-parameter tensors keyed by PyTorch names (e.g. gradients) in the Flax params layout."""
    by_index = {str(i): name for name, i in {**DECONVS, **BATCH_NORMS}.items()}
    out: dict = {}
    for full_name, tensor in tensors.items():
        _, index, kind = full_name.split(".")
        flax_name = by_index[index]
        array = _numpy(tensor)
        if flax_name.startswith("deconv"):
            key = "kernel" if kind == "weight" else "bias"
            array = deconv_kernel_to_flax(array) if kind == "weight" else array
        else:
            key = "scale" if kind == "weight" else "bias"
        out.setdefault(flax_name, {})[key] = array
    return out


def nhwc(images: np.ndarray) -> torch.Tensor:
    """NHWC numpy images -> NCHW torch tensor."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(images).transpose(0, 3, 1, 2)))
