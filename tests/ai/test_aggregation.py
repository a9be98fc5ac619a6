"""The pure aggregation maths: streaming weighted mean, strategies and per-round client choices."""

import itertools
import json
import random
import struct
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load, save, save_file

from fl_server_ai.aggregation import (
    STRATEGIES,
    FedAvg,
    FedDC,
    FedProx,
    RunningWeightedSum,
    daisy_chain_permutation,
    get_strategy,
    sample_clients,
    weighted_mean,
)

SHAPES = {"conv.weight": (8, 3, 3, 3), "conv.bias": (8,), "fc.weight": (10, 72), "fc.bias": (10,), "scale": ()}


def random_model(generator: torch.Generator, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return {name: torch.randn(shape, generator=generator).to(dtype) for name, shape in SHAPES.items()}


@pytest.fixture
def updates() -> list[tuple[dict[str, torch.Tensor], float]]:
    generator = torch.Generator().manual_seed(1234)
    sample_sizes = [1, 7, 250, 3, 1000, 42, 19]  # very unequal, so an unweighted mean would be far off
    return [(random_model(generator), float(n)) for n in sample_sizes]


def hand_mean(updates: list[tuple[dict[str, torch.Tensor], float]]) -> dict[str, torch.Tensor]:
    """sum(n_i * w_i) / sum(n_i), written out without the code under test."""
    total = sum(n for _, n in updates)
    result = {}
    for name in SHAPES:
        acc = torch.zeros(SHAPES[name], dtype=torch.float64)
        for weights, n in updates:
            acc = acc + n * weights[name].double()
        result[name] = acc / total
    return result


def streamed(updates: list[tuple[dict[str, torch.Tensor], float]], like: dict[str, torch.Tensor]) -> dict:
    accumulator = RunningWeightedSum()
    for weights, n in updates:
        accumulator.fold(weights, n)
    return accumulator.finalize(like)


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


# --- streaming weighted mean ---------------------------------------------------------------------------------------


def test_streaming_equals_weighted_mean_and_hand_computation(updates):
    like = updates[0][0]
    result = streamed(updates, like)
    direct = weighted_mean(updates, like)
    expected = hand_mean(updates)

    for name, shape in SHAPES.items():
        assert result[name].dtype == torch.float32
        assert result[name].shape == shape
        assert direct[name].dtype == torch.float32
        torch.testing.assert_close(result[name].double(), expected[name], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(direct[name].double(), expected[name], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(result[name], direct[name], rtol=1e-6, atol=1e-6)
    # The sample sizes matter: the plain mean of the updates is clearly different.
    unweighted = {k: torch.stack([w[k] for w, _ in updates]).mean(0) for k in SHAPES}
    assert max_difference(result, unweighted) > 0.1


def test_accumulator_counts_and_total_weight(updates):
    accumulator = RunningWeightedSum()
    for weights, n in updates:
        accumulator.fold(weights, n)
    assert accumulator.count == len(updates)
    assert accumulator.total_weight == sum(n for _, n in updates)
    assert all(tensor.dtype == torch.float64 for tensor in accumulator.sums.values())


def test_arrival_order_does_not_matter(updates):
    like = updates[0][0]
    reference = streamed(updates, like)
    orders = list(itertools.permutations(range(len(updates))))
    for order in random.Random(7).sample(orders, 40):
        assert max_difference(streamed([updates[i] for i in order], like), reference) < 1e-6


def test_single_update_is_returned_unchanged(updates):
    weights, _ = updates[0]
    result = streamed([(weights, 17.0)], weights)
    assert all(torch.equal(result[k], weights[k]) for k in SHAPES)


# --- persistence between requests ----------------------------------------------------------------------------------


def test_state_round_trip_mid_stream_continues_to_the_same_result(updates):
    like = updates[0][0]
    uninterrupted = streamed(updates, like)

    first = RunningWeightedSum()
    for weights, n in updates[:3]:
        first.fold(weights, n)
    tensors, metadata = first.to_state()
    assert all(isinstance(value, str) for value in metadata.values())
    saved = {name: tensor.clone() for name, tensor in tensors.items()}
    resumed = RunningWeightedSum.from_state(tensors, metadata)
    assert (resumed.count, resumed.total_weight) == (3, first.total_weight)
    for weights, n in updates[3:]:
        resumed.fold(weights, n)
    # The loaded tensors are not written to (safetensors may hand out read-only buffers).
    assert all(torch.equal(tensors[k], saved[k]) for k in SHAPES)
    result = resumed.finalize(like)
    assert all(torch.equal(result[k], uninterrupted[k]) for k in SHAPES)


def read_metadata(data: bytes) -> dict[str, str]:
    """The __metadata__ of a safetensors byte string (8-byte little-endian header length, JSON header)."""
    (header_length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + header_length])["__metadata__"]


def via_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str], tmp_path: Path) -> tuple[dict, dict]:
    data = save(tensors, metadata=metadata)
    return load(data), read_metadata(data)


def via_file(tensors: dict[str, torch.Tensor], metadata: dict[str, str], tmp_path: Path) -> tuple[dict, dict]:
    path = tmp_path / "round.safetensors"
    save_file(tensors, path, metadata=metadata)
    with safe_open(path, framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()  # noqa: SIM118


@pytest.mark.parametrize("through", [via_bytes, via_file])
def test_state_round_trip_through_safetensors(updates, tmp_path, through):
    updates = [(weights, n + 1 / 3) for weights, n in updates]  # fractional weights: metadata must keep every digit
    like = updates[0][0]
    uninterrupted = streamed(updates, like)

    accumulator = RunningWeightedSum()
    for index, (weights, n) in enumerate(updates):
        # Persist and reload after every update, as the server does between requests.
        accumulator.fold(weights, n)
        tensors, metadata = through(*accumulator.to_state(), tmp_path)
        accumulator = RunningWeightedSum.from_state(tensors, metadata)
        assert accumulator.count == index + 1
    result = accumulator.finalize(like)
    assert all(torch.equal(result[k], uninterrupted[k]) for k in SHAPES)


def test_from_state_rejects_bad_metadata():
    with pytest.raises(ValueError, match="metadata"):
        RunningWeightedSum.from_state({}, {"count": "1"})
    with pytest.raises(ValueError, match="inconsistent"):
        RunningWeightedSum.from_state({"a": torch.zeros(2)}, {"count": "0", "total_weight": "0.0"})


# --- dtypes --------------------------------------------------------------------------------------------------------


def test_dtypes_are_preserved_and_integer_buffers_rounded():
    like = {
        "half": torch.zeros(4, dtype=torch.float16),
        "double": torch.zeros(3, dtype=torch.float64),
        "bn.num_batches_tracked": torch.tensor(0, dtype=torch.int64),
    }
    a = {
        "half": torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float16),
        "double": torch.tensor([1.0, 1e-12, 3.0], dtype=torch.float64),
        "bn.num_batches_tracked": torch.tensor(10, dtype=torch.int64),
    }
    b = {
        "half": torch.tensor([3.0, 2.0, 0.0, -4.0], dtype=torch.float16),
        "double": torch.tensor([1.0 + 3e-15, 4e-12, -3.0], dtype=torch.float64),
        "bn.num_batches_tracked": torch.tensor(11, dtype=torch.int64),
    }
    for result in (streamed([(a, 1), (b, 2)], like), weighted_mean([(a, 1), (b, 2)], like)):
        assert {k: v.dtype for k, v in result.items()} == {k: v.dtype for k, v in like.items()}
        torch.testing.assert_close(result["half"], torch.tensor([7 / 3, 2.0, 1.0, -4 / 3], dtype=torch.float16))
        # float64 precision survives: float32 accumulation would lose the 1e-15 and 1e-12 parts.
        expected_double = torch.tensor([1.0 + 2e-15, 3e-12, -1.0], dtype=torch.float64)
        torch.testing.assert_close(result["double"], expected_double, rtol=1e-15, atol=1e-18)
        # (10 * 1 + 11 * 2) / 3 = 10.67: rounded to 11, not truncated to 10.
        assert result["bn.num_batches_tracked"].item() == 11
        assert result["bn.num_batches_tracked"].shape == ()


def test_integer_updates_are_accumulated_in_float64():
    accumulator = RunningWeightedSum()
    accumulator.fold({"n": torch.tensor([2**40, 3], dtype=torch.int64)}, 1)
    accumulator.fold({"n": torch.tensor([2**40, 4], dtype=torch.int64)}, 1)
    assert accumulator.sums["n"].dtype == torch.float64
    assert accumulator.finalize({"n": torch.zeros(2, dtype=torch.int64)})["n"].tolist() == [2**40, 4]


# --- rejected input ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda w: {k: v for k, v in w.items() if k != "fc.bias"}, "fc.bias"),
        (lambda w: {**w, "extra.weight": torch.zeros(2)}, "extra.weight"),
        (lambda w: {**w, "conv.weight": torch.zeros(8, 3, 3)}, "conv.weight"),
        (lambda w: {**w, "fc.weight": torch.full((10, 72), float("nan"))}, "fc.weight"),
    ],
)
def test_fold_mismatch_raises_naming_the_tensor_and_leaves_the_sums_untouched(updates, change, named):
    like = updates[0][0]
    accumulator = RunningWeightedSum()
    accumulator.fold(*updates[0])
    before = accumulator.finalize(like)
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        accumulator.fold(change(updates[1][0]), 5)
    assert (accumulator.count, accumulator.total_weight) == (1, updates[0][1])
    after = accumulator.finalize(like)
    assert all(torch.equal(before[k], after[k]) for k in SHAPES)
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        weighted_mean([updates[0], (change(updates[1][0]), 5)], like)


def test_finalize_rejects_a_like_that_does_not_match(updates):
    accumulator = RunningWeightedSum()
    accumulator.fold(*updates[0])
    with pytest.raises(ValueError, match="scale"):
        accumulator.finalize({k: v for k, v in updates[0][0].items() if k != "scale"})


def test_finalize_with_nothing_folded_raises(updates):
    with pytest.raises(ValueError, match="nothing"):
        RunningWeightedSum().finalize(updates[0][0])
    with pytest.raises(ValueError, match="nothing"):
        weighted_mean([], updates[0][0])


@pytest.mark.parametrize("weight", [0, -1, -0.5, float("nan"), float("inf")])
def test_non_positive_weight_raises(updates, weight):
    accumulator = RunningWeightedSum()
    with pytest.raises(ValueError, match="weight"):
        accumulator.fold(updates[0][0], weight)
    assert accumulator.count == 0
    with pytest.raises(ValueError, match="weight"):
        weighted_mean([(updates[0][0], weight)], updates[0][0])


# --- memory --------------------------------------------------------------------------------------------------------


def test_folding_keeps_only_the_sums():
    names = {"big.weight": (1000, 999), "big.bias": (1000,)}  # 1M parameters
    generator = torch.Generator().manual_seed(0)
    accumulator = RunningWeightedSum()
    pointers = None
    for n in range(1, 51):
        update = {name: torch.randn(shape, generator=generator) for name, shape in names.items()}
        alive = [weakref.ref(tensor) for tensor in update.values()]
        accumulator.fold(update, n)
        del update
        assert all(ref() is None for ref in alive), "the accumulator kept a reference to an update"
        if pointers is None:
            pointers = {name: t.data_ptr() for name, t in accumulator.sums.items()}
        # In place: the same buffers all along, one per tensor name.
        assert {name: t.data_ptr() for name, t in accumulator.sums.items()} == pointers
    assert set(accumulator.sums) == set(names)
    assert accumulator.count == 50
    assert accumulator.total_weight == sum(range(1, 51))


# --- strategies ----------------------------------------------------------------------------------------------------


def test_fedavg_is_the_streaming_weighted_mean(updates):
    strategy = FedAvg()
    assert (strategy.name, strategy.streaming) == ("FedAvg", True)
    assert strategy.round_config({}) == {}
    assert all(strategy.is_aggregation_round(r, {}) for r in range(5))
    like = updates[0][0]
    aggregated = strategy.aggregate(updates, like)
    accumulator = strategy.new_accumulator()
    assert isinstance(accumulator, RunningWeightedSum)
    assert accumulator.count == 0
    assert strategy.new_accumulator() is not accumulator
    for weights, n in updates:
        accumulator.fold(weights, n)
    assert max_difference(accumulator.finalize(like), aggregated) < 1e-6


def test_fedprox_round_config():
    strategy = FedProx()
    assert strategy.name == "FedProx"
    assert strategy.streaming
    assert strategy.round_config({}) == {"proximal_mu": 0.01}
    assert strategy.round_config({"proximal_mu": 0.5}) == {"proximal_mu": 0.5}
    config = strategy.round_config({"proximal_mu": 1})
    assert config == {"proximal_mu": 1.0}
    assert isinstance(config["proximal_mu"], float)
    with pytest.raises(ValueError, match="proximal_mu"):
        strategy.round_config({"proximal_mu": -0.1})


@pytest.mark.parametrize(
    ("period", "expected"),
    [
        (1, [True, True, True, True, True, True]),
        (2, [False, True, False, True, False, True]),
        (3, [False, False, True, False, False, True]),
    ],
)
def test_feddc_aggregates_every_period_th_round(period, expected):
    strategy = FedDC()
    options = {"daisy_chain_period": period}
    assert strategy.name == "FedDC"
    assert [strategy.is_aggregation_round(r, options) for r in range(6)] == expected
    assert strategy.round_config(options) == {"daisy_chain_period": period}


def test_feddc_defaults_and_rejects_bad_periods():
    strategy = FedDC()
    assert strategy.round_config({}) == {"daisy_chain_period": 1}
    assert strategy.is_aggregation_round(0, {})
    for period in (0, -2, 1.5, "2"):
        with pytest.raises(ValueError, match="daisy_chain_period"):
            strategy.is_aggregation_round(0, {"daisy_chain_period": period})


def test_get_strategy():
    assert set(STRATEGIES) == {"FedAvg", "FedProx", "FedDC"}
    for name, cls in STRATEGIES.items():
        strategy = get_strategy(name)
        assert type(strategy) is cls
        assert strategy.name == name
    with pytest.raises(ValueError, match="FedMedian") as error:
        get_strategy("FedMedian")
    assert all(name in str(error.value) for name in STRATEGIES)


# --- daisy chaining ------------------------------------------------------------------------------------------------


def clients_of(n: int) -> list[str]:
    return [f"client-{i:02d}" for i in range(n)]


@pytest.mark.parametrize("n", [2, 3, 4, 5, 8, 13])
def test_daisy_chain_permutation_is_a_derangement_covering_everyone(n):
    clients = clients_of(n)
    for seed, round_number in itertools.product(range(4), range(6)):
        mapping = daisy_chain_permutation(clients, seed, round_number)
        assert set(mapping) == set(clients)
        assert sorted(mapping.values()) == sorted(clients)  # every model continued by exactly one client
        assert all(client != source for client, source in mapping.items())


def test_daisy_chain_permutation_is_deterministic_and_ignores_input_order():
    clients = clients_of(7)
    state = random.getstate()
    first = daisy_chain_permutation(clients, 42, 3)
    assert random.getstate() == state  # the global generator is left alone
    random.seed(999)
    assert daisy_chain_permutation(clients, 42, 3) == first
    assert daisy_chain_permutation(list(reversed(clients)), 42, 3) == first
    assert daisy_chain_permutation(tuple(random.sample(clients, 7)), 42, 3) == first


@pytest.mark.parametrize("n", [3, 4, 6])
def test_daisy_chain_permutation_changes_between_rounds_and_seeds(n):
    clients = clients_of(n)
    per_round = [daisy_chain_permutation(clients, 5, r) for r in range(8)]
    assert any(mapping != per_round[0] for mapping in per_round[1:])
    per_seed = [daisy_chain_permutation(clients, s, 0) for s in range(8)]
    assert any(mapping != per_seed[0] for mapping in per_seed[1:])


def test_daisy_chain_permutation_small_inputs():
    assert daisy_chain_permutation([], 0, 0) == {}
    assert daisy_chain_permutation(["solo"], 0, 0) == {"solo": "solo"}
    assert daisy_chain_permutation(["b", "a"], 0, 0) == {"a": "b", "b": "a"}
    with pytest.raises(ValueError, match="distinct"):
        daisy_chain_permutation(["a", "a", "b"], 0, 0)


# --- client sampling -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "fraction", "minimum", "size"),
    [
        (100, 0.07, 1, 7),  # 0.07 * 100 is 7.000000000000001 in floats: still 7
        (25, 0.28, 1, 7),  # likewise 7.000000000000001
        (7, 0.5, 1, 4),
        (10, 1.0, 1, 10),
        (10, 0.01, 1, 1),
        (10, 0.01, 3, 3),
        (10, 0.5, 20, 10),  # capped at n
        (1, 0.3, 1, 1),
        (0, 0.5, 1, 0),
    ],
)
def test_sample_clients_size(n, fraction, minimum, size):
    clients = clients_of(n)
    sample = sample_clients(clients, fraction, seed=1, round_number=0, minimum=minimum)
    assert len(sample) == size
    assert len(set(sample)) == size
    assert set(sample) <= set(clients)
    assert sample == sorted(sample)


def test_sample_clients_is_deterministic_per_round_and_ignores_input_order():
    clients = clients_of(20)
    state = random.getstate()
    first = sample_clients(clients, 0.25, seed=3, round_number=4)
    assert random.getstate() == state
    assert sample_clients(list(reversed(clients)), 0.25, seed=3, round_number=4) == first
    per_round = [sample_clients(clients, 0.25, seed=3, round_number=r) for r in range(8)]
    assert any(sample != per_round[0] for sample in per_round[1:])
    # Over many rounds everyone gets picked sometimes.
    picked = set().union(*(sample_clients(clients, 0.25, seed=3, round_number=r) for r in range(100)))
    assert picked == set(clients)


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5, float("nan")])
def test_sample_clients_rejects_bad_fractions(fraction):
    with pytest.raises(ValueError, match="fraction"):
        sample_clients(clients_of(5), fraction, seed=0, round_number=0)


# --- purity --------------------------------------------------------------------------------------------------------


def test_aggregation_package_does_not_import_django():
    code = (
        "import sys, fl_server_ai.aggregation; "
        "bad = sorted(m for m in sys.modules if m == 'django' or m.startswith(('django.', 'rest_framework'))); "
        "assert not bad, bad"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


def test_fold_of_large_mixed_dtype_tensors_matches_float64_reference() -> None:
    """Tensors beyond one conversion chunk, non-contiguous views and non-float32 dtypes fold exactly."""
    from fl_server_ai.aggregation.mean import FOLD_CHUNK

    generator = torch.Generator().manual_seed(7)
    n = 2 * FOLD_CHUNK + 123
    base = torch.randn(n, 3, generator=generator)
    updates = [
        {
            "wide": torch.randn(n, generator=generator),
            "view": base.t()[index % 3],  # non-contiguous
            "half": torch.randn(FOLD_CHUNK + 5, generator=generator).half(),
            "double": torch.randn(17, generator=generator, dtype=torch.float64),
            "count": torch.tensor(index + 1),
        }
        for index in range(3)
    ]
    sizes = [3.0, 5.0, 11.0]
    accumulator = RunningWeightedSum()
    for update, size in zip(updates, sizes, strict=True):
        accumulator.fold(update, size)
    for name in updates[0]:
        expected = sum(u[name].double() * size for u, size in zip(updates, sizes, strict=True))
        assert accumulator.sums[name].dtype == torch.float64
        if name == "double":  # products of float64 values round (a fused multiply-add may differ in the last bit)
            torch.testing.assert_close(accumulator.sums[name], expected, rtol=1e-14, atol=0)
        else:  # products of narrower values are exact in float64
            assert torch.equal(accumulator.sums[name], expected), name


def test_finalize_like_meta_placeholders_equals_finalize_like_real_weights() -> None:
    from fl_server_core.serialization import spec_of_weights

    like = {"w": torch.zeros(4, 3), "h": torch.zeros(5, dtype=torch.float16), "n": torch.zeros((), dtype=torch.int64)}
    accumulator = RunningWeightedSum()
    for index, size in enumerate((2.0, 7.0)):
        accumulator.fold({k: torch.full_like(v, index + 0.3, dtype=torch.float32) for k, v in like.items()}, size)
    placeholders = {spec.name: spec.placeholder() for spec in spec_of_weights(like)}
    assert all(t.is_meta for t in placeholders.values())
    by_meta, by_real = accumulator.finalize(placeholders), accumulator.finalize(like)
    assert list(by_meta) == list(by_real) == list(like)
    for name in like:
        assert by_meta[name].dtype == like[name].dtype and torch.equal(by_meta[name], by_real[name]), name
