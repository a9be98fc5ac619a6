"""Per-round client choices: daisy-chain permutations and client sampling, deterministic in (seed, round)."""

import math
import random
from collections.abc import Sequence


def _sorted_distinct(clients: Sequence[str]) -> list[str]:
    """The clients sorted, so that input order does not matter; ValueError on duplicates."""
    ordered = sorted(clients)
    if len(set(ordered)) != len(ordered):
        raise ValueError("client names must be distinct")
    return ordered


def daisy_chain_permutation(clients: Sequence[str], seed: int, round_number: int) -> dict[str, str]:
    """Client -> client whose local model it continues from; a derangement whenever there are >= 2 clients."""
    ordered = _sorted_distinct(clients)
    if len(ordered) < 2:
        return {client: client for client in ordered}
    rng = random.Random(f"daisy-chain:{seed}:{round_number}")  # own generator: global RNG state is never touched
    sources = ordered[:]
    # Rejection sampling gives a uniform derangement; a random shuffle is one with probability ~1/e.
    while True:
        rng.shuffle(sources)
        if all(client != source for client, source in zip(ordered, sources, strict=True)):
            return dict(zip(ordered, sources, strict=True))


def sample_clients(
    clients: Sequence[str], fraction: float, seed: int, round_number: int, minimum: int = 1
) -> list[str]:
    """max(minimum, ceil(fraction * n)) clients (at most n), drawn deterministically for (seed, round), sorted."""
    if not (0 < fraction <= 1):
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    if minimum < 0:
        raise ValueError(f"minimum must be >= 0, got {minimum!r}")
    ordered = _sorted_distinct(clients)
    # The tolerance keeps float noise (0.07 * 100 == 7.000000000000001) from adding a client.
    count = min(len(ordered), max(minimum, math.ceil(fraction * len(ordered) - 1e-9)))
    rng = random.Random(f"sample-clients:{seed}:{round_number}")
    return sorted(rng.sample(ordered, count))
