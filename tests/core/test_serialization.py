"""Tests for fl_server_core.serialization (pure: no database, no Django)."""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

from fl_server_core.serialization import (
    FORMAT_SAFETENSORS,
    FORMAT_STATE_DICT,
    FORMAT_TORCHSCRIPT,
    ModelFormatError,
    PickledModelError,
    TensorSpec,
    WeightsMismatchError,
    all_finite,
    detect_format,
    export_torchscript,
    load_global_model,
    load_torchscript,
    parameter_count,
    parameter_spec,
    read_flat_tensor,
    read_weights,
    safetensors_to_weights,
    spec_of_weights,
    validate_weights,
    weights_to_safetensors,
)

# --------------------------------------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.bn(self.fc(x)))


def _torch_save(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _jit_save(module) -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    return buffer.getvalue()


def _assert_same_weights(actual, expected) -> None:
    assert list(actual) == list(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name], tensor), name


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    module = Net()
    module.train()
    module(torch.randn(8, 4))  # update the BatchNorm running stats and num_batches_tracked
    return module.eval()


@pytest.fixture
def state_dict(net):
    return {k: v.clone() for k, v in net.state_dict().items()}


@pytest.fixture
def ts_bytes(net) -> bytes:
    return _jit_save(torch.jit.script(net))


@pytest.fixture
def sd_bytes(state_dict) -> bytes:
    return _torch_save(state_dict)


@pytest.fixture
def st_bytes(state_dict) -> bytes:
    return safetensors.torch.save(state_dict)


# Payloads that run code when unpickled. Nothing in the server may ever trigger them.
MARKS: list[str] = []


def _mark(path: str) -> None:
    MARKS.append(path)
    Path(path).write_text("pwned")


class Exploit:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (_mark, (self.path,))


# --------------------------------------------------------------------------------------------------------------------
# detect_format
# --------------------------------------------------------------------------------------------------------------------


def test_detect_format_accepted_formats(ts_bytes, sd_bytes, st_bytes, net):
    assert detect_format(ts_bytes) == FORMAT_TORCHSCRIPT
    assert detect_format(sd_bytes) == FORMAT_STATE_DICT
    assert detect_format(st_bytes) == FORMAT_SAFETENSORS
    # torch.save(module) is a torch.save zip as well; the loaders refuse it (weights_only)
    assert detect_format(_torch_save(net)) == FORMAT_STATE_DICT


@pytest.mark.parametrize(
    "payload",
    [
        pickle.dumps({"a": 1}),
        pickle.dumps({"a": 1}, protocol=0),
        pickle.dumps([1, 2, 3], protocol=1),
        pickle.dumps({"w": [0.5]}, protocol=5),
    ],
)
def test_detect_format_raw_pickle(payload):
    with pytest.raises(PickledModelError, match="arbitrary code"):
        detect_format(payload)


def test_detect_format_legacy_torch_save(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer, _use_new_zipfile_serialization=False)
    with pytest.raises(PickledModelError, match="legacy non-zip"):
        detect_format(buffer.getvalue())


def test_pickled_model_error_message_names_alternatives(net):
    with pytest.raises(PickledModelError) as info:
        read_weights(_torch_save(net))
    message = str(info.value)
    assert "arbitrary code" in message
    assert "torch.jit.save(torch.jit.script(model)" in message
    assert "torch.save(model.state_dict()" in message
    assert "safetensors" in message
    assert "Net" in message  # names the pickled class


@pytest.mark.parametrize(
    "payload",
    [b"", b"hello world, not a model", b"\x00" * 64, b"{}", b"GIF89a" + bytes(range(200))],
)
def test_garbage_is_model_format_error(payload):
    with pytest.raises(ModelFormatError) as info:
        detect_format(payload)
    assert not isinstance(info.value, PickledModelError)
    with pytest.raises(ModelFormatError):
        read_weights(payload)


def test_empty_message():
    with pytest.raises(ModelFormatError, match="empty"):
        read_weights(b"")
    with pytest.raises(ModelFormatError, match="empty"):
        load_global_model(b"")


@pytest.mark.parametrize("which", ["ts", "sd", "st"])
def test_truncated_files_are_model_format_errors(which, ts_bytes, sd_bytes, st_bytes):
    data = {"ts": ts_bytes, "sd": sd_bytes, "st": st_bytes}[which]
    for cut in (len(data) // 2, len(data) - 10, 12):
        with pytest.raises(ModelFormatError):
            read_weights(data[:cut])


def test_corrupt_zip_entries_are_model_format_errors(ts_bytes, sd_bytes):
    for data in (ts_bytes, sd_bytes):
        corrupt = bytearray(data)
        middle = len(corrupt) // 2
        corrupt[middle : middle + 64] = b"\xff" * 64
        with pytest.raises(ModelFormatError):
            read_weights(bytes(corrupt))


def test_zip_that_is_not_a_model():
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("readme.txt", "hello")
        archive.writestr("archive/other.bin", b"\x00")
    with pytest.raises(ModelFormatError, match=r"neither a TorchScript archive nor a torch\.save"):
        detect_format(buffer.getvalue())


def test_corrupt_safetensors_header():
    header = b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 999]}}'
    data = len(header).to_bytes(8, "little") + header + b"\x00" * 16
    assert detect_format(data) == FORMAT_SAFETENSORS
    with pytest.raises(ModelFormatError, match="safetensors"):
        read_weights(data)


# --------------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------------


def test_load_torchscript_round_trip(net, ts_bytes):
    loaded = load_torchscript(ts_bytes)
    assert isinstance(loaded, torch.jit.ScriptModule)
    _assert_same_weights(loaded.state_dict(), net.state_dict())
    x = torch.randn(5, 4)
    loaded.eval()
    assert torch.allclose(loaded(x), net(x))


def test_load_torchscript_wrong_formats(net, sd_bytes, st_bytes):
    with pytest.raises(PickledModelError):
        load_torchscript(_torch_save(net))
    with pytest.raises(ModelFormatError, match=r"torch\.save file") as info:
        load_torchscript(sd_bytes)
    assert not isinstance(info.value, PickledModelError)
    with pytest.raises(ModelFormatError, match="safetensors"):
        load_torchscript(st_bytes)


@pytest.mark.parametrize("which", ["ts", "sd", "st"])
def test_read_weights_each_format(which, ts_bytes, sd_bytes, st_bytes, state_dict):
    data = {"ts": ts_bytes, "sd": sd_bytes, "st": st_bytes}[which]
    weights = read_weights(data)
    if which == "st":  # safetensors sorts its entries; names, not order, identify tensors
        weights = {name: weights[name] for name in state_dict}
    _assert_same_weights(weights, state_dict)
    assert weights["bn.num_batches_tracked"].dtype == torch.int64
    assert int(weights["bn.num_batches_tracked"]) == 1
    assert all(type(t) is torch.Tensor for t in weights.values())


def test_read_weights_rejects_pickled_module(net):
    with pytest.raises(PickledModelError, match="arbitrary code"):
        read_weights(_torch_save(net))


def test_read_weights_rejects_nested_checkpoint(state_dict):
    data = _torch_save({"epoch": 3, "state_dict": state_dict})
    with pytest.raises(ModelFormatError, match=r"checkpoint\['state_dict'\]"):
        read_weights(data)


def test_read_weights_rejects_non_flat_content(state_dict):
    with pytest.raises(ModelFormatError, match="'epoch' is a int, not a tensor"):
        read_weights(_torch_save({**state_dict, "epoch": 3}))
    with pytest.raises(ModelFormatError, match="single tensor"):
        read_weights(_torch_save(torch.ones(3)))
    with pytest.raises(ModelFormatError, match="list"):
        read_weights(_torch_save([torch.ones(3)]))
    with pytest.raises(ModelFormatError, match="empty"):
        read_weights(_torch_save({}))


def test_raw_pickle_exploit_never_runs(tmp_path):
    marker = tmp_path / "raw-marker"
    payload = pickle.dumps(Exploit(str(marker)))
    for call in (detect_format, read_weights, load_torchscript, load_global_model):
        with pytest.raises(PickledModelError):
            call(payload)
    with pytest.raises(PickledModelError):
        read_flat_tensor(payload, 3)
    assert not marker.exists()
    assert str(marker) not in MARKS
    # control: the payload is live, a plain unpickler does run it
    pickle.loads(payload)
    assert marker.exists()


def test_torch_save_exploit_never_runs(tmp_path):
    marker = tmp_path / "torch-save-marker"
    payload = _torch_save({"w": torch.ones(2), "x": Exploit(str(marker))})
    with pytest.raises(PickledModelError):
        read_weights(payload)
    with pytest.raises(PickledModelError):
        load_global_model(payload)
    with pytest.raises(PickledModelError):
        load_torchscript(payload)
    with pytest.raises(PickledModelError):
        read_flat_tensor(_torch_save(Exploit(str(marker))), 3)
    assert not marker.exists()
    assert str(marker) not in MARKS
    # control: the payload is live, torch.load(weights_only=False) does run it
    torch.load(io.BytesIO(payload), weights_only=False)
    assert marker.exists()


class _SetStateModule(nn.Module):
    """A TorchScript module whose __setstate__ writes a file when torch.jit.load runs it."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w

    @torch.jit.export
    def __getstate__(self) -> tuple[str, bool, torch.Tensor]:
        return (self.path, self.training, self.w)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, bool, torch.Tensor]) -> None:
        self.path = state[0]
        self.training = state[1]
        self.w = state[2]
        torch.ops.aten.save(torch.ones(1), self.path)


def test_torchscript_setstate_never_runs(tmp_path):
    marker = tmp_path / "torchscript-marker"
    payload = _jit_save(torch.jit.script(_SetStateModule(str(marker))))
    assert detect_format(payload) == FORMAT_TORCHSCRIPT
    for call in (load_torchscript, read_weights, load_global_model):
        with pytest.raises(ModelFormatError, match="__setstate__"):
            call(payload)
    with pytest.raises(ModelFormatError, match="__setstate__"):
        export_torchscript(payload, {"w": torch.zeros(2)})
    assert not marker.exists()
    # control: a plain torch.jit.load does run __setstate__
    torch.jit.load(io.BytesIO(payload))
    assert marker.exists()


def test_load_global_model(net, ts_bytes, sd_bytes, st_bytes):
    model = load_global_model(ts_bytes)
    assert isinstance(model, torch.jit.ScriptModule)
    _assert_same_weights(model.state_dict(), net.state_dict())

    pickled = _torch_save(net)
    with pytest.raises(PickledModelError, match=r"torch\.jit\.save\(torch\.jit\.script\(model\)"):
        load_global_model(pickled)
    trusted = load_global_model(pickled, allow_pickle=True)
    assert isinstance(trusted, Net)
    _assert_same_weights(trusted.state_dict(), net.state_dict())

    for data in (sd_bytes, st_bytes):
        for allow_pickle in (False, True):
            with pytest.raises(ModelFormatError, match="must carry its architecture") as info:
                load_global_model(data, allow_pickle=allow_pickle)
            assert not isinstance(info.value, PickledModelError)


def test_load_global_model_legacy_and_raw_pickle(net):
    buffer = io.BytesIO()
    torch.save(net, buffer, _use_new_zipfile_serialization=False)
    legacy = buffer.getvalue()
    with pytest.raises(PickledModelError, match="arbitrary code"):
        load_global_model(legacy)
    assert isinstance(load_global_model(legacy, allow_pickle=True), Net)
    with pytest.raises(ModelFormatError, match=r"not a torch\.nn\.Module"):
        load_global_model(_torch_save([1, 2]), allow_pickle=True)
    raw = pickle.dumps(net)
    with pytest.raises(PickledModelError):
        load_global_model(raw)
    with pytest.raises(ModelFormatError, match=r"cannot be loaded with torch\.load"):
        load_global_model(raw, allow_pickle=True)


# --------------------------------------------------------------------------------------------------------------------
# Specs and validation
# --------------------------------------------------------------------------------------------------------------------


def test_parameter_spec(net, ts_bytes):
    spec = parameter_spec(net)
    assert [s.name for s in spec] == list(net.state_dict())
    by_name = {s.name: s for s in spec}
    assert by_name["fc.weight"] == TensorSpec("fc.weight", (3, 4), "float32", True)
    assert by_name["bn.running_mean"].is_parameter is False
    assert by_name["bn.num_batches_tracked"] == TensorSpec("bn.num_batches_tracked", (), "int64", False)
    assert parameter_spec(load_torchscript(ts_bytes)) == spec
    assert parameter_count(spec) == 12 + 3 + 3 + 3 + 3 + 3 + 1
    assert parameter_count(spec, parameters_only=True) == 12 + 3 + 3 + 3
    assert [TensorSpec.from_json(s.to_json()) for s in spec] == spec


def test_spec_json_validation():
    with pytest.raises(ValueError, match="expected keys"):
        TensorSpec.from_json({"name": "x"})
    with pytest.raises(ValueError, match="shape"):
        TensorSpec.from_json({"name": "x", "shape": [-1], "dtype": "float32", "is_parameter": True})


def test_spec_of_weights(state_dict):
    spec = spec_of_weights(state_dict)
    assert [s.name for s in spec] == list(state_dict)
    assert spec[0].shape == (3, 4) and spec[0].dtype == "float32"


def test_validate_weights_accepts_matching(net, state_dict):
    validate_weights(state_dict, parameter_spec(net))


def test_validate_weights_reports_every_problem(net, state_dict):
    spec = parameter_spec(net)
    bad = dict(state_dict)
    del bad["fc.bias"]
    bad["extra"] = torch.zeros(1)
    bad["fc.weight"] = torch.zeros(4, 3)
    bad["bn.num_batches_tracked"] = torch.tensor(1.0)
    bad["bn.weight"] = torch.tensor([1.0, float("nan"), 1.0])
    bad["bn.bias"] = torch.tensor([float("inf"), 0.0, 0.0])
    with pytest.raises(WeightsMismatchError) as info:
        validate_weights(bad, spec)
    message = str(info.value)
    assert "missing tensors: fc.bias" in message
    assert "unexpected tensors: extra" in message
    assert "shape mismatch: fc.weight (expected [3, 4], got [4, 3])" in message
    assert "dtype mismatch: bn.num_batches_tracked (expected int64, got float32)" in message
    assert "non-finite values (NaN or Inf) in: bn.weight, bn.bias" in message


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_validate_weights_rejects_non_finite(net, state_dict, value):
    state_dict["fc.weight"][1, 2] = value
    with pytest.raises(WeightsMismatchError, match=r"non-finite values \(NaN or Inf\) in: fc\.weight"):
        validate_weights(state_dict, parameter_spec(net))


def test_validate_weights_caps_long_lists():
    spec = [TensorSpec(f"t{i}", (1,), "float32", True) for i in range(12)]
    with pytest.raises(WeightsMismatchError, match="missing tensors: t0, t1, t2, t3, t4 and 7 more"):
        validate_weights({}, spec)


# --------------------------------------------------------------------------------------------------------------------
# read_flat_tensor
# --------------------------------------------------------------------------------------------------------------------


def test_read_flat_tensor_good():
    tensor = torch.randn(10)
    assert torch.equal(read_flat_tensor(_torch_save(tensor), 10), tensor)
    assert torch.equal(read_flat_tensor(safetensors.torch.save({"m": tensor}), 10), tensor)
    assert read_flat_tensor(_torch_save(tensor.double()), 10).dtype == torch.float64
    assert read_flat_tensor(_torch_save(tensor.half()), 10).dtype == torch.float32


def test_read_flat_tensor_rejects():
    with pytest.raises(ModelFormatError, match="10 elements but got 9"):
        read_flat_tensor(_torch_save(torch.randn(9)), 10)
    with pytest.raises(ModelFormatError, match=r"1-D tensor with 10 elements but got shape \[2, 5\]"):
        read_flat_tensor(_torch_save(torch.randn(2, 5)), 10)
    with pytest.raises(ModelFormatError, match=r"floating point.*int64"):
        read_flat_tensor(_torch_save(torch.arange(10)), 10)
    bad = torch.randn(10)
    bad[3] = float("nan")
    with pytest.raises(ModelFormatError, match="non-finite"):
        read_flat_tensor(_torch_save(bad), 10)
    with pytest.raises(ModelFormatError, match="exactly one tensor"):
        read_flat_tensor(safetensors.torch.save({"a": torch.randn(10), "b": torch.randn(10)}), 10)
    with pytest.raises(ModelFormatError, match="TorchScript"):
        read_flat_tensor(_jit_save(torch.jit.script(Net())), 10)


# --------------------------------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------------------------------


def test_safetensors_round_trip_with_shared_and_strided_storage(state_dict):
    base = torch.arange(12, dtype=torch.float32)
    weights = {**state_dict, "a": base[:6], "b": base[6:], "t": base.view(3, 4).t()}
    data = weights_to_safetensors(weights)
    assert detect_format(data) == FORMAT_SAFETENSORS
    _assert_same_weights(safetensors_to_weights(data), weights)


def test_safetensors_to_weights_rejects_garbage():
    with pytest.raises(ModelFormatError):
        safetensors_to_weights(b"not safetensors")


def test_export_torchscript(net, ts_bytes, state_dict):
    new = {k: v + 1 if v.is_floating_point() else v + 5 for k, v in state_dict.items()}
    exported = export_torchscript(ts_bytes, new)
    module = load_torchscript(exported)
    _assert_same_weights(module.state_dict(), new)
    x = torch.randn(3, 4)
    reference = Net().eval()
    reference.load_state_dict(new)
    assert torch.allclose(module(x), reference(x))


def test_export_torchscript_rejects_mismatch(ts_bytes, state_dict):
    bad = dict(state_dict)
    del bad["fc.bias"]
    with pytest.raises(WeightsMismatchError, match=r"missing tensors: fc\.bias"):
        export_torchscript(ts_bytes, bad)
    bad = {**state_dict, "fc.weight": torch.zeros(4, 3)}
    with pytest.raises(WeightsMismatchError, match=r"fc\.weight"):
        export_torchscript(ts_bytes, bad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_is_exact_even_when_the_sum_overflows(dtype: torch.dtype) -> None:
    big = torch.full((1000,), torch.finfo(dtype).max / 2, dtype=dtype)  # finite values whose sum overflows
    assert not torch.isfinite(big.sum()) and all_finite(big)
    for bad in (float("nan"), float("inf"), float("-inf")):
        for base in (big, torch.zeros(1000, dtype=dtype)):
            broken = base.clone()
            broken[123] = bad
            assert not all_finite(broken), (dtype, bad)
    mixed = torch.zeros(10, dtype=dtype)
    mixed[0], mixed[1] = float("inf"), float("-inf")  # inf + -inf = nan: still caught
    assert not all_finite(mixed)


def test_tensor_spec_placeholder_allocates_nothing_and_refuses_unknown_dtypes() -> None:
    placeholder = TensorSpec("w", (1000, 1000, 1000), "bfloat16", True).placeholder()
    assert placeholder.is_meta and placeholder.shape == (1000, 1000, 1000) and placeholder.dtype == torch.bfloat16
    for bad in ("float128", "Tensor", "__class__"):
        with pytest.raises(ValueError, match="Unknown dtype"):
            TensorSpec("w", (2,), bad, True).placeholder()
