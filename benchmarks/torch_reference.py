"""PyTorch reference of the GON models, written from GON-SPEC with the authors' semantics.

NCHW tensors, `torch.autograd.grad(..., create_graph=True)` for the latent, BatchNorm2d in training mode in every
pass (batch statistics; running averages updated, never used), `torch.optim.Adam`. Used by the parity tests
(float64) and by `benchmarks.step_time` (float32).

`flax_variables(decoder)` ports the PyTorch weights into gonjax's Flax layout (GON-SPEC 2.1), so both frameworks
can start from the very same parameters.
"""
from __future__ import annotations

import dataclasses
import math

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


class ConvEncoder(nn.Module):
    """GON-SPEC 2.2: image (B, nc, 32, 32) -> (B, nz)."""

    def __init__(self, nz: int = 256, ngf: int = 16, nc: int = 1, activation: str = "elu"):
        super().__init__()
        act = ACTIVATIONS[activation]
        self.net = nn.Sequential(
            nn.Conv2d(nc, ngf, 4, 2, 1), nn.BatchNorm2d(ngf), act(),
            nn.Conv2d(ngf, 2 * ngf, 4, 2, 1), nn.BatchNorm2d(2 * ngf), act(),
            nn.Conv2d(2 * ngf, 4 * ngf, 4, 2, 1), nn.BatchNorm2d(4 * ngf), act(),
            nn.Conv2d(4 * ngf, nz, 4, 1, 0), act(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten(1)


def reparameterise(mu, logvar, eps):
    return mu + eps * torch.exp(0.5 * logvar)


class VariationalGON(nn.Module):
    """GON-SPEC 2.3: z0 -> (Dec(mu + eps exp(logvar/2)), mu, logvar), eps given by the caller."""

    def __init__(self, nz: int = 256, ngf: int = 16, nc: int = 1, activation: str = "elu"):
        super().__init__()
        self.nz = nz
        self.fc_mu, self.fc_logvar = nn.Linear(nz, nz), nn.Linear(nz, nz)
        self.decoder = ConvDecoder(nz, ngf, nc, activation)

    def forward(self, z0, eps):
        mu, logvar = self.fc_mu(z0), self.fc_logvar(z0)
        return self.decoder(reparameterise(mu, logvar, eps)), mu, logvar


class ConvAutoencoder(nn.Module):
    """GON-SPEC 2.2: Dec(Enc(x))."""

    def __init__(self, nz: int = 256, ngf: int = 16, nc: int = 1, activation: str = "elu"):
        super().__init__()
        self.nz = nz
        self.encoder = ConvEncoder(nz, ngf, nc, activation)
        self.decoder = ConvDecoder(nz, ngf, nc, activation)

    def forward(self, x):
        return self.decoder(self.encoder(x))


class ConvVAE(nn.Module):
    """GON-SPEC 2.2: x -> (Dec(mu + eps exp(logvar/2)), mu, logvar), heads on Enc(x), eps given by the caller."""

    def __init__(self, nz: int = 256, ngf: int = 16, nc: int = 1, activation: str = "elu"):
        super().__init__()
        self.nz = nz
        self.encoder = ConvEncoder(nz, ngf, nc, activation)
        self.fc_mu, self.fc_logvar = nn.Linear(nz, nz), nn.Linear(nz, nz)
        self.decoder = ConvDecoder(nz, ngf, nc, activation)

    def forward(self, x, eps):
        h = self.encoder(x)
        mu, logvar = self.fc_mu(h), self.fc_logvar(h)
        return self.decoder(reparameterise(mu, logvar, eps)), mu, logvar


class Siren(nn.Module):
    """GON-SPEC 2.4: per pixel concat(coordinate, latent) (materialised, as P does) -> 4 sine layers -> nc."""

    def __init__(self, nz: int = 32, hidden: int = 256, depth: int = 4, nc: int = 1, w0: float = 30.0):
        super().__init__()
        self.nz, self.w0 = nz, w0
        self.hidden_layers = nn.ModuleList([nn.Linear(2 + nz, hidden)]
                                           + [nn.Linear(hidden, hidden) for _ in range(depth - 1)])
        self.out = nn.Linear(hidden, nc)
        with torch.no_grad():  # GON-SPEC 2.5; biases keep PyTorch's default U(-1/sqrt(in), 1/sqrt(in))
            self.hidden_layers[0].weight.uniform_(-1 / (2 + nz), 1 / (2 + nz))
            for layer in [*self.hidden_layers[1:], self.out]:
                bound = math.sqrt(6 / hidden) / w0
                layer.weight.uniform_(-bound, bound)

    def forward(self, coords: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """coords (P, 2), z (B, nz) -> (B, P, nc)."""
        b, p = z.shape[0], coords.shape[0]
        h = torch.cat([coords[None].expand(b, p, 2), z[:, None, :].expand(b, p, z.shape[1])], dim=-1)
        for layer in self.hidden_layers:
            h = torch.sin(self.w0 * layer(h))
        return self.out(h)


def coordinate_grid(size: int, dtype=torch.float64) -> torch.Tensor:
    """(size*size, 2): linspace(-1, 1) per axis, meshgrid 'ij', row-major (coordinate 0 = row)."""
    axis = torch.linspace(-1, 1, size, dtype=dtype)
    rows, cols = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=-1)


def gon_loss(reconstruction: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """GON-SPEC 4.1 in NCHW: squared error summed over channels, mean over batch and pixels."""
    return ((reconstruction - images) ** 2).sum(1).mean()


def bce_kld_loss(reconstruction, images, mu, logvar, kl_weight: float = 1.0, bce: str = "eps"):
    """GON-SPEC 4.3: BCE + kl_weight * KLD, each summed per image, mean over batch. The BCE's logs: "eps", J's
    +1e-10 inside them; "clamp", PyTorch's own `binary_cross_entropy` (logs clamped at -100), as P's
    Variational-GON.py calls it."""
    if bce == "clamp":
        per_element = torch.nn.functional.binary_cross_entropy(reconstruction, images, reduction="none")
    else:
        per_element = -(images * torch.log(reconstruction + 1e-10) + (1 - images) * torch.log(1 - reconstruction + 1e-10))
    kld = (-0.5 * (1 + logvar - mu ** 2 - torch.exp(logvar)).sum(1)).mean()
    return per_element.sum((1, 2, 3)).mean() + kl_weight * kld


@dataclasses.dataclass
class Step:
    """What one training step produced; gradients stay in each parameter's `.grad`."""

    loss: torch.Tensor
    reconstruction: torch.Tensor
    latent: torch.Tensor | None = None
    inner_loss: torch.Tensor | None = None


def _origin(score, z0: torch.Tensor, train: bool, detach: bool = False):
    """z = -d score(z0) / d z0 at z0 = 0, keeping the graph (create_graph=True) when training through it."""
    inner = score(z0)
    grad, = torch.autograd.grad(inner, [z0], create_graph=train and not detach)
    latent = -grad
    return (latent.detach() if detach or not train else latent), inner


def _zeros_latent(images: torch.Tensor, nz: int) -> torch.Tensor:
    return torch.zeros(images.shape[0], nz, dtype=images.dtype, device=images.device, requires_grad=True)


def gon_forward(decoder: ConvDecoder, images: torch.Tensor, nz: int, detach: bool = False, train: bool = True):
    """The origin step of GON-SPEC 4.1 (4.2 with `detach`): latent, inner loss, outer loss, reconstruction.

    With `train`, the graph through the latent is kept so the outer loss can be back-propagated into the
    decoder; without, only the latent's own gradient is taken (evaluation).
    """
    latent, inner = _origin(lambda z: gon_loss(decoder(z), images), _zeros_latent(images, nz), train, detach)
    with torch.set_grad_enabled(train):
        reconstruction = decoder(latent)
    return latent, inner, gon_loss(reconstruction, images), reconstruction


def _optimise(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def gon_train_step(decoder: ConvDecoder, optimizer, images, nz: int, detach: bool = False) -> Step:
    """One GON training step: origin step, backward through the latent, Adam step."""
    latent, inner, outer, reconstruction = gon_forward(decoder, images, nz, detach)
    _optimise(optimizer, outer)
    return Step(outer.detach(), reconstruction.detach(), latent.detach(), inner.detach())


def vgon_forward(model: VariationalGON, images, eps_inner, eps_outer, kl_weight=1.0, train: bool = True,
                 bce: str = "eps"):
    """The V-GON origin step (GON-SPEC 4.3): eps_inner in the inner pass, an independent eps_outer in the outer.
    Returns latent, inner loss, outer loss, reconstruction."""

    def score(z, eps):
        reconstruction, mu, logvar = model(z, eps)
        return bce_kld_loss(reconstruction, images, mu, logvar, kl_weight, bce), reconstruction

    latent, inner = _origin(lambda z: score(z, eps_inner)[0], _zeros_latent(images, model.nz), train)
    with torch.set_grad_enabled(train):
        outer, reconstruction = score(latent, eps_outer)
    return latent, inner, outer, reconstruction


def vgon_train_step(model: VariationalGON, optimizer, images, eps_inner, eps_outer, kl_weight=1.0,
                    bce: str = "eps") -> Step:
    latent, inner, outer, reconstruction = vgon_forward(model, images, eps_inner, eps_outer, kl_weight, bce=bce)
    _optimise(optimizer, outer)
    return Step(outer.detach(), reconstruction.detach(), latent.detach(), inner.detach())


def implicit_gon_forward(siren: Siren, images_nhwc: torch.Tensor, reduction: str = "mean", train: bool = True):
    """The Implicit GON origin step (GON-SPEC 4.4) on NHWC images: per-pixel MSE ("mean", J) or P's
    `((g - x)**2).sum(1).mean()` on (B, pixels, channels) ("sum": pixels summed, batch and channels averaged).
    Returns latent, inner loss, outer loss and the reconstruction, NCHW like the other models'."""
    b, size, _, nc = images_nhwc.shape
    pixels = images_nhwc.reshape(b, size * size, nc)
    coords = coordinate_grid(size, images_nhwc.dtype).to(images_nhwc.device)

    def loss(output):
        squared = (output - pixels) ** 2
        return squared.mean() if reduction == "mean" else squared.sum(1).mean()

    latent, inner = _origin(lambda z: loss(siren(coords, z)), _zeros_latent(pixels, siren.nz), train)
    with torch.set_grad_enabled(train):
        output = siren(coords, latent)
    reconstruction = output.reshape(b, size, size, nc).permute(0, 3, 1, 2)
    return latent, inner, loss(output), reconstruction


def implicit_gon_train_step(siren: Siren, optimizer, images_nhwc: torch.Tensor, reduction: str = "mean") -> Step:
    latent, inner, outer, reconstruction = implicit_gon_forward(siren, images_nhwc, reduction)
    _optimise(optimizer, outer)
    return Step(outer.detach(), reconstruction.detach(), latent.detach(), inner.detach())


def ae_train_step(model: ConvAutoencoder, optimizer, images) -> Step:
    reconstruction = model(images)
    loss = gon_loss(reconstruction, images)
    _optimise(optimizer, loss)
    return Step(loss.detach(), reconstruction.detach())


def vae_train_step(model: ConvVAE, optimizer, images, eps, kl_weight=1.0, bce: str = "eps") -> Step:
    reconstruction, mu, logvar = model(images, eps)
    loss = bce_kld_loss(reconstruction, images, mu, logvar, kl_weight, bce)
    _optimise(optimizer, loss)
    return Step(loss.detach(), reconstruction.detach())


def make_adam(module: nn.Module, lr: float) -> torch.optim.Adam:
    """GON-SPEC 5: Adam, betas (0.9, 0.999), eps 1e-8, no weight decay."""
    return torch.optim.Adam(module.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)


def adam_steps(optimizer: torch.optim.Adam) -> int:
    """How many steps `optimizer` has taken: Adam's own per-parameter step counter (0 before the first)."""
    counts = {int(state["step"]) for state in optimizer.state.values() if "step" in state}
    if len(counts) > 1:
        raise ValueError(f"parameters disagree on Adam's step count: {sorted(counts)}")
    return counts.pop() if counts else 0


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().copy()  # a copy: .numpy() shares memory with tensors Adam updates in place


def deconv_kernel_to_flax(weight: np.ndarray) -> np.ndarray:
    """PyTorch ConvTranspose2d weight (Cin, Cout, kh, kw) -> flax ConvTranspose kernel (kh, kw, Cin, Cout) with
    `transpose_kernel=False`: the spatially flipped kernel (GON-SPEC 2.1)."""
    return np.ascontiguousarray(weight.transpose(2, 3, 0, 1)[::-1, ::-1])


# PyTorch layer index in `.net` -> gonjax layer name, per Sequential
DECODER_LAYERS = {0: "deconv1", 1: "bn1", 3: "deconv2", 4: "bn2", 6: "deconv3", 7: "bn3", 9: "deconv4"}
ENCODER_LAYERS = {0: "conv1", 1: "bn1", 3: "conv2", 4: "bn2", 6: "conv3", 7: "bn3", 9: "conv4"}
BATCH_NORMS = {"bn1": 1, "bn2": 4, "bn3": 7}  # gonjax name -> index in either Sequential


def _layer(layer: nn.Module, tensor) -> tuple[dict, dict]:
    """(params, batch_stats) of one layer in flax layout; `tensor(p)` picks what to read (weights or grads)."""
    weight, bias = _numpy(tensor(layer.weight)), _numpy(tensor(layer.bias))
    if isinstance(layer, nn.ConvTranspose2d):
        return {"kernel": deconv_kernel_to_flax(weight), "bias": bias}, {}
    if isinstance(layer, nn.Conv2d):  # (Cout, Cin, kh, kw) -> (kh, kw, Cin, Cout)
        return {"kernel": np.ascontiguousarray(weight.transpose(2, 3, 1, 0)), "bias": bias}, {}
    if isinstance(layer, nn.Linear):  # (out, in) -> (in, out)
        return {"kernel": np.ascontiguousarray(weight.T), "bias": bias}, {}
    if isinstance(layer, nn.BatchNorm2d):
        return {"scale": weight, "bias": bias}, {"mean": _numpy(layer.running_mean), "var": _numpy(layer.running_var)}
    raise TypeError(f"no flax layout for {type(layer).__name__}")


def _named_layers(module: nn.Module):
    """(gonjax path, PyTorch layer) of every layer with weights, in gonjax's nesting."""
    if isinstance(module, Siren):
        for i, layer in enumerate(module.hidden_layers):
            yield (f"hidden{i + 1}",), layer
        yield ("out",), module.out
        return
    if isinstance(module, (ConvDecoder, ConvEncoder)):
        names = DECODER_LAYERS if isinstance(module, ConvDecoder) else ENCODER_LAYERS
        for index, name in names.items():
            yield (name,), module.net[index]
        return
    if hasattr(module, "encoder"):
        for path, layer in _named_layers(module.encoder):
            yield ("encoder", *path), layer
    if hasattr(module, "fc_mu"):
        yield ("heads", "mu"), module.fc_mu
        yield ("heads", "logvar"), module.fc_logvar
    for path, layer in _named_layers(module.decoder):
        yield ("decoder", *path), layer


def _nest(tree: dict, path: tuple[str, ...]) -> dict:
    for name in path:
        tree = tree.setdefault(name, {})
    return tree


def _tree(module: nn.Module, tensor) -> tuple[dict, dict]:
    params, stats = {}, {}
    for path, layer in _named_layers(module):
        p, s = _layer(layer, tensor)
        _nest(params, path).update(p)
        if s:
            _nest(stats, path).update(s)
    return params, stats


def load_flax_variables(module: nn.Module, variables: dict) -> nn.Module:
    """Copy gonjax's {'params', 'batch_stats'} into this PyTorch module (the inverse of `flax_variables`)."""
    def at(tree, path):
        for name in path:
            tree = tree[name]
        return {k: np.array(v) for k, v in tree.items()}  # writable copies (jax arrays read as read-only)

    with torch.no_grad():
        for path, layer in _named_layers(module):
            p = at(variables["params"], path)
            if isinstance(layer, nn.ConvTranspose2d):  # undo deconv_kernel_to_flax: unflip, (kh, kw, Cin, Cout) -> (Cin, Cout, kh, kw)
                weight = p["kernel"][::-1, ::-1].transpose(2, 3, 0, 1)
            elif isinstance(layer, nn.Conv2d):
                weight = p["kernel"].transpose(3, 2, 0, 1)
            elif isinstance(layer, nn.Linear):
                weight = p["kernel"].T
            else:  # BatchNorm2d
                weight = p["scale"]
                s = at(variables["batch_stats"], path)
                layer.running_mean.copy_(torch.from_numpy(np.ascontiguousarray(s["mean"])))
                layer.running_var.copy_(torch.from_numpy(np.ascontiguousarray(s["var"])))
            layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight)).to(layer.weight.dtype))
            layer.bias.copy_(torch.from_numpy(np.ascontiguousarray(p["bias"])).to(layer.bias.dtype))
    return module


def flax_variables(module: nn.Module) -> dict:
    """{'params', 'batch_stats'} of the matching gonjax module holding this PyTorch module's weights and BN
    running statistics (copies)."""
    params, stats = _tree(module, lambda p: p)
    return {"params": params, "batch_stats": stats}


def flax_grads(module: nn.Module) -> dict:
    """The gradients left in the parameters' `.grad` by the last backward, in the flax params layout."""
    return _tree(module, lambda p: p.grad)[0]


def nhwc(images: np.ndarray) -> torch.Tensor:
    """NHWC numpy images -> NCHW torch tensor."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(images).transpose(0, 3, 1, 2)))
