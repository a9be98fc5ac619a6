"""Builders shared by the tests: small real PyTorch models and their uploads."""

import io

import torch
from safetensors.torch import save as save_safetensors


class TinyNet(torch.nn.Module):
    """A small network with parameters, buffers and dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(4, 8)
        self.norm = torch.nn.BatchNorm1d(8)
        self.drop = torch.nn.Dropout(0.1)
        self.fc2 = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.relu(self.norm(self.fc1(x)))))


def tiny_net(seed: int = 0) -> TinyNet:
    """A TinyNet with reproducible weights."""
    torch.manual_seed(seed)
    return TinyNet().eval()


def torchscript_bytes(module: torch.nn.Module | None = None) -> bytes:
    """A TorchScript archive of the module."""
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module or tiny_net()), buffer)
    return buffer.getvalue()


def state_dict_bytes(weights: dict[str, torch.Tensor]) -> bytes:
    """A state dict saved with torch.save."""
    buffer = io.BytesIO()
    torch.save(weights, buffer)
    return buffer.getvalue()


def safetensors_bytes(weights: dict[str, torch.Tensor]) -> bytes:
    """A state dict as safetensors."""
    return save_safetensors({k: v.contiguous() for k, v in weights.items()})


def pickled_module_bytes(module: torch.nn.Module | None = None) -> bytes:
    """A whole module pickled with torch.save (must be refused)."""
    buffer = io.BytesIO()
    torch.save(module or tiny_net(), buffer)
    return buffer.getvalue()


def shifted_weights(seed: int, delta: float) -> dict[str, torch.Tensor]:
    """A valid update: the seed's weights with floating tensors shifted by delta."""
    weights = tiny_net(seed).state_dict()
    return {k: (v + delta if v.is_floating_point() else v.clone()) for k, v in weights.items()}


class Doubler(torch.nn.Module):
    """A preprocessing module: doubles its input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2
