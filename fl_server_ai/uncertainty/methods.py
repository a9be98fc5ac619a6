"""Uncertainty methods: predictions with a mean over samples or members, plus uncertainty measures."""

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch

from fl_server_ai.uncertainty.measures import uncertainty_measures
from fl_server_ai.uncertainty.swag import assign_flat_parameters, flatten_parameters, sample_swag_weights

DROPOUT_TYPES: tuple[type[torch.nn.Module], ...] = (
    torch.nn.Dropout,
    torch.nn.Dropout1d,
    torch.nn.Dropout2d,
    torch.nn.Dropout3d,
    torch.nn.AlphaDropout,
    torch.nn.FeatureAlphaDropout,
)
DROPOUT_NAMES = frozenset(cls.__name__ for cls in DROPOUT_TYPES)


def _check_n(n: int) -> int:
    """The number of samples; ValueError unless it is an integer >= 1."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"number of samples N must be an integer >= 1, got {n!r}")
    return n


def _forward(module: Callable[[torch.Tensor], Any], x: torch.Tensor, softmax: bool) -> torch.Tensor:
    """One forward pass without autograd; the output as probabilities over the last dim when `softmax`."""
    with torch.no_grad():
        output = module(x)
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"model output must be a tensor, got {type(output).__name__}")
    if not softmax:
        return output
    if output.dim() < 2:
        raise ValueError(f"softmax needs outputs of shape (B, ..., C), got {tuple(output.shape)}")
    return torch.softmax(output.float() if not output.is_floating_point() else output, dim=-1)


def _summarise(outputs: Sequence[torch.Tensor], softmax: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The mean of the stacked outputs and their uncertainty measures."""
    stacked = torch.stack(list(outputs))
    if not stacked.is_floating_point():
        stacked = stacked.to(torch.get_default_dtype())
    return stacked.mean(dim=0), uncertainty_measures(stacked, probabilities=softmax)


def _seed_from(generator: torch.Generator) -> int:
    """A 63-bit seed drawn from the generator."""
    return int(torch.randint(0, 2**63 - 1, (1,), generator=generator).item())


def is_dropout(module: torch.nn.Module) -> bool:
    """Whether the (possibly TorchScript) submodule is a dropout layer."""
    if isinstance(module, DROPOUT_TYPES):
        return True
    if isinstance(module, torch.jit.RecursiveScriptModule):
        name = getattr(module, "original_name", "")
        return isinstance(name, str) and (name.startswith("Dropout") or name in DROPOUT_NAMES)
    return False


class UncertaintyMethod(ABC):
    """A way to predict with a model and report how uncertain the prediction is."""

    name: ClassVar[str]

    @abstractmethod
    def predict(
        self, x: torch.Tensor, n: int, softmax: bool, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The mean prediction over samples/members (probabilities if `softmax`) and the uncertainty measures."""


class NoUncertainty(UncertaintyMethod):
    """A single deterministic eval pass; the measures are always empty ({}), with or without softmax."""

    name = "NONE"

    def __init__(self, module: torch.nn.Module) -> None:
        """Wrap the module, put into eval mode."""
        self.module = module.eval()

    def predict(
        self, x: torch.Tensor, n: int, softmax: bool, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The single eval-mode prediction and no measures; `n` and `generator` are ignored."""
        self.module.eval()
        return _forward(self.module, x, softmax), {}


class MCDropout(UncertaintyMethod):
    """Monte Carlo dropout: N stochastic passes with only the dropout layers in train mode (BatchNorm stays in eval)."""

    name = "MC_DROPOUT"

    def __init__(self, module: torch.nn.Module) -> None:
        """Wrap the module; ValueError if it has no dropout layer."""
        self.module = module
        self.dropouts = [sub for sub in module.modules() if is_dropout(sub)]
        if not self.dropouts:
            raise ValueError("MC dropout needs dropout layers; the model has none")
        self._set_modes()

    def _set_modes(self) -> None:
        """Eval mode everywhere, then train mode for the dropout layers only."""
        self.module.eval()
        for dropout in self.dropouts:
            dropout.train()

    def predict(
        self, x: torch.Tensor, n: int, softmax: bool, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """N passes, each seeded from `generator` in a forked RNG (reproducible; global RNG state untouched)."""
        _check_n(n)
        self._set_modes()
        devices = [x.device.index if x.device.index is not None else torch.cuda.current_device()] if x.is_cuda else []
        outputs = []
        for _ in range(n):
            seed = _seed_from(generator)
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                outputs.append(_forward(self.module, x, softmax))
        return _summarise(outputs, softmax)


class Ensemble(UncertaintyMethod):
    """Deep ensemble: one eval pass per member; `n` is ignored (every member is used)."""

    name = "ENSEMBLE"

    def __init__(self, members: Sequence[torch.nn.Module]) -> None:
        """Wrap the members (at least one), put into eval mode."""
        self.members = list(members)
        if not self.members:
            raise ValueError("an ensemble needs at least one member")
        for member in self.members:
            member.eval()

    def predict(
        self, x: torch.Tensor, n: int, softmax: bool, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The mean over the members' eval predictions and their disagreement."""
        outputs = []
        for member in self.members:
            member.eval()
            outputs.append(_forward(member, x, softmax))
        return _summarise(outputs, softmax)


class SWAG(UncertaintyMethod):
    """Diagonal SWAG: N weight samples from N(first, scale * diag(var)), one eval pass each (BatchNorm stats as is)."""

    name = "SWAG"

    def __init__(
        self,
        module: torch.nn.Module,
        first: torch.Tensor,
        second: torch.Tensor,
        floor: float = 1e-30,
        scale: float = 1.0,
    ) -> None:
        """Wrap the module and the flat first/second moments of its parameters (`parameters()` order)."""
        expected = flatten_parameters(module).numel()
        for label, moment in (("first", first), ("second", second)):
            if moment.numel() != expected:
                raise ValueError(f"SWAG {label} moment has {moment.numel()} values, the model has {expected}")
        self.module = module
        self.first = first.reshape(-1)
        self.second = second.reshape(-1)
        self.floor = floor
        self.scale = scale

    def predict(
        self, x: torch.Tensor, n: int, softmax: bool, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """N sampled weight vectors, assigned to a deep copy of the module (the original is never changed)."""
        samples = sample_swag_weights(self.first, self.second, _check_n(n), generator, self.floor, self.scale)
        model = copy.deepcopy(self.module).eval()
        outputs = []
        for flat in samples:
            assign_flat_parameters(model, flat)
            outputs.append(_forward(model, x, softmax))
        return _summarise(outputs, softmax)


METHODS: dict[str, type[UncertaintyMethod]] = {cls.name: cls for cls in (NoUncertainty, Ensemble, MCDropout, SWAG)}


def method_for(name: str, **kwargs: Any) -> UncertaintyMethod:
    """The method called `name` ("NONE" | "ENSEMBLE" | "MC_DROPOUT" | "SWAG"), built with `kwargs`."""
    cls = METHODS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown uncertainty method {name!r}; expected one of {sorted(METHODS)}")
    return cls(**kwargs)
