"""The demo's learning task: scikit-learn's bundled digits, split non-IID across clients, and a small MLP."""

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

NUM_CLASSES = 10
INPUT_SIZE = 64


class DigitsNet(torch.nn.Module):
    """A two-layer perceptron for 8x8 digit images (with dropout, usable for MC dropout)."""

    def __init__(self, hidden: int = 64, dropout: float = 0.1) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(INPUT_SIZE, hidden)
        self.drop = torch.nn.Dropout(dropout)
        self.fc2 = torch.nn.Linear(hidden, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


@dataclass(frozen=True)
class Split:
    """Features and labels."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


def load_task(num_clients: int, alpha: float, seed: int) -> tuple[list[Split], Split]:
    """Client training sets (label skew from a Dirichlet(alpha) per class) and a shared test set."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=0.25, random_state=seed, stratify=digits.target
    )
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for label in range(NUM_CLASSES):
        indices = rng.permutation(np.flatnonzero(y_train == label))
        shares = rng.dirichlet([alpha] * num_clients)
        cuts = (np.cumsum(shares)[:-1] * len(indices)).astype(int)
        for client, chunk in enumerate(np.split(indices, cuts)):
            parts[client].extend(chunk.tolist())
    clients = [Split(torch.from_numpy(x_train[p]), torch.from_numpy(y_train[p]).long()) for p in parts]
    return clients, Split(torch.from_numpy(x_test), torch.from_numpy(y_test).long())


def train_locally(
    model: torch.nn.Module, data: Split, epochs: int, seed: int, lr: float = 0.1, proximal_mu: float = 0.0
) -> torch.nn.Module:
    """SGD on one client's data (with FedProx's proximal term when mu > 0)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    anchor = [p.detach().clone() for p in model.parameters()]
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=generator)
        for batch in order.split(32):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(data.x[batch]), data.y[batch])
            if proximal_mu > 0:
                loss = loss + proximal_mu / 2 * sum(
                    ((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True)
                )
            loss.backward()
            optimizer.step()
    model.eval()
    return model


def accuracy(model: torch.nn.Module, data: Split) -> float:
    """Share of correctly classified samples."""
    model.eval()
    with torch.no_grad():
        return float((model(data.x).argmax(dim=1) == data.y).float().mean())


def class_counts(data: Split) -> list[int]:
    """Samples per class."""
    return torch.bincount(data.y, minlength=NUM_CLASSES).tolist()
