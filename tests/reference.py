"""Independent float64 NumPy references: the conv decoder written from the PyTorch definitions (scatter-form
transposed convolution, training-mode batch norm), with weights in PyTorch's layout."""
import numpy as np


def flax_to_torch_deconv(kernel: np.ndarray) -> np.ndarray:
    """flax ConvTranspose kernel (kh, kw, in, out; transpose_kernel=False) -> PyTorch (in, out, kh, kw).

    Inverse of GON-SPEC 2.1's mapping `torch_w.transpose(2, 3, 0, 1)[::-1, ::-1]`.
    """
    return np.ascontiguousarray(np.asarray(kernel)[::-1, ::-1].transpose(2, 3, 0, 1))


def conv_transpose(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, stride: int, padding: int) -> np.ndarray:
    """PyTorch ConvTranspose2d on NHWC input: every input pixel scatters weight * value into the output."""
    n, h, w, _ = x.shape
    _, cout, k, _ = weight.shape
    full = np.zeros((n, (h - 1) * stride + k, (w - 1) * stride + k, cout))
    for i in range(h):
        for j in range(w):
            full[:, i * stride:i * stride + k, j * stride:j * stride + k, :] += np.einsum(
                "nc,cokl->nklo", x[:, i, j, :], weight)
    out_h, out_w = full.shape[1] - 2 * padding, full.shape[2] - 2 * padding
    return full[:, padding:padding + out_h, padding:padding + out_w, :] + bias


def batch_norm(x: np.ndarray, scale: np.ndarray, bias: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    mean = x.mean(axis=(0, 1, 2))
    var = ((x - mean) ** 2).mean(axis=(0, 1, 2))
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def elu(x):
    return np.where(x > 0, x, np.expm1(np.minimum(x, 0)))


def decoder(params: dict, z: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """GON-SPEC 2.1 decoder in float64, reading flax-layout params (converted to PyTorch's layout here); `eps`:
    batch norm's."""
    x = np.asarray(z, np.float64)[:, None, None, :]
    for i, (stride, padding) in enumerate([(1, 0), (2, 1), (2, 1)], start=1):
        layer = params[f"deconv{i}"]
        x = conv_transpose(x, flax_to_torch_deconv(layer["kernel"]), np.asarray(layer["bias"]), stride, padding)
        bn = params[f"bn{i}"]
        x = elu(batch_norm(x, np.asarray(bn["scale"]), np.asarray(bn["bias"]), eps))
    layer = params["deconv4"]
    x = conv_transpose(x, flax_to_torch_deconv(layer["kernel"]), np.asarray(layer["bias"]), 2, 1)
    return 1.0 / (1.0 + np.exp(-x))


def gon_inner_loss(params: dict, z: np.ndarray, images: np.ndarray) -> float:
    """GON-SPEC 4.1 loss: channel sum, mean over batch and pixels."""
    return float((((decoder(params, z) - images) ** 2).sum(-1)).mean())


def finite_difference_grad(f, z: np.ndarray, h: float = 1e-5) -> np.ndarray:
    """Central differences of a scalar function of an array."""
    grad = np.zeros_like(z)
    for index in np.ndindex(z.shape):
        step = np.zeros_like(z)
        step[index] = h
        grad[index] = (f(z + step) - f(z - step)) / (2 * h)
    return grad
