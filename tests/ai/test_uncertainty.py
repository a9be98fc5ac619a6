"""The pure uncertainty maths: measures, SWAG sampling, flat parameters and the prediction methods."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fl_server_ai.uncertainty import (
    SWAG,
    Ensemble,
    MCDropout,
    NoUncertainty,
    assign_flat_parameters,
    flatten_parameters,
    method_for,
    sample_swag_weights,
    swag_variance,
    uncertainty_measures,
)

LN2 = math.log(2.0)


def gen(seed: int = 0) -> torch.Generator:
    """A CPU generator with a fixed seed."""
    return torch.Generator().manual_seed(seed)


class DropNet(torch.nn.Module):
    """Linear -> BatchNorm -> ReLU -> dropout -> Linear."""

    def __init__(self, dropout: type[torch.nn.Module] = torch.nn.Dropout) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(4, 16)
        self.bn = torch.nn.BatchNorm1d(16)
        self.drop = dropout(0.5)
        self.fc2 = torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x)))))


def drop_net(seed: int = 0, dropout: type[torch.nn.Module] = torch.nn.Dropout) -> DropNet:
    """A DropNet with reproducible weights and non-trivial BatchNorm running statistics."""
    torch.manual_seed(seed)
    net = DropNet(dropout)
    net.train()
    with torch.no_grad():
        net(torch.randn(32, 4))  # move the running stats away from their defaults
    return net.eval()


def plain_net(seed: int = 0) -> torch.nn.Sequential:
    """A small network without dropout."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def scripted(module: torch.nn.Module) -> torch.nn.Module:
    """The TorchScript version of the module."""
    return torch.jit.script(module)


def bn_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the module's buffers (BatchNorm running statistics)."""
    return {name: buffer.clone() for name, buffer in module.named_buffers()}


X = torch.randn(5, 4, generator=gen(123))


# --- measures ------------------------------------------------------------------------------------------------------


def test_measures_match_hand_computed_values():
    stacked = torch.tensor(
        [
            [[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]],  # sample 0
            [[0.5, 0.0, 0.5], [0.0, 1.0, 0.0]],  # sample 1
        ]
    )
    measures = uncertainty_measures(stacked, probabilities=True)
    assert set(measures) == {"variance", "std", "predictive_entropy", "expected_entropy", "mutual_info"}
    expected_variance = torch.tensor([[0.0, 0.0625, 0.0625], [0.25, 0.25, 0.0]])
    torch.testing.assert_close(measures["variance"], expected_variance)
    torch.testing.assert_close(measures["std"], expected_variance.sqrt())
    # row 0: mean [.5, .25, .25] -> H = 1.5 ln 2; each sample H = ln 2; row 1: mean [.5, .5, 0] -> ln 2, samples 0
    torch.testing.assert_close(measures["predictive_entropy"], torch.tensor([1.5 * LN2, LN2]))
    torch.testing.assert_close(measures["expected_entropy"], torch.tensor([LN2, 0.0]))
    torch.testing.assert_close(measures["mutual_info"], torch.tensor([0.5 * LN2, LN2]))
    for value in measures.values():
        assert torch.isfinite(value).all()


def test_measures_without_probabilities_have_only_variance_and_std():
    stacked = torch.tensor([[[1.0], [2.0]], [[3.0], [2.0]], [[5.0], [2.0]]])
    measures = uncertainty_measures(stacked, probabilities=False)
    assert set(measures) == {"variance", "std"}
    torch.testing.assert_close(measures["variance"], torch.tensor([[8.0 / 3.0], [0.0]]))
    torch.testing.assert_close(measures["std"], torch.tensor([[math.sqrt(8.0 / 3.0)], [0.0]]))


def test_zero_disagreement_has_zero_mutual_info():
    p = torch.tensor([[0.2, 0.3, 0.5], [0.7, 0.2, 0.1]])
    measures = uncertainty_measures(torch.stack([p, p, p]), probabilities=True)
    torch.testing.assert_close(measures["mutual_info"], torch.zeros(2))
    torch.testing.assert_close(measures["predictive_entropy"], measures["expected_entropy"])
    torch.testing.assert_close(measures["variance"], torch.zeros(2, 3))
    assert (measures["predictive_entropy"] > 0).all()


def test_identical_one_hot_predictions_have_zero_entropy():
    one_hot = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    measures = uncertainty_measures(torch.stack([one_hot, one_hot]), probabilities=True)
    for key in ("predictive_entropy", "expected_entropy", "mutual_info"):
        assert not torch.isnan(measures[key]).any()
        torch.testing.assert_close(measures[key], torch.zeros(2))


@pytest.mark.parametrize("classes", [2, 3, 10])
def test_uniform_predictions_have_entropy_log_c(classes):
    uniform = torch.full((4, 2, classes), 1.0 / classes)
    measures = uncertainty_measures(uniform, probabilities=True)
    torch.testing.assert_close(measures["predictive_entropy"], torch.full((2,), math.log(classes)))
    torch.testing.assert_close(measures["expected_entropy"], torch.full((2,), math.log(classes)))
    torch.testing.assert_close(measures["mutual_info"], torch.zeros(2))


def test_a_single_sample_has_zero_variance_and_mutual_info():
    p = torch.tensor([[[0.5, 0.5, 0.0], [0.1, 0.1, 0.8]]])
    measures = uncertainty_measures(p, probabilities=True)
    torch.testing.assert_close(measures["variance"], torch.zeros(2, 3))
    torch.testing.assert_close(measures["std"], torch.zeros(2, 3))
    torch.testing.assert_close(measures["mutual_info"], torch.zeros(2))
    torch.testing.assert_close(measures["predictive_entropy"], measures["expected_entropy"])
    assert measures["predictive_entropy"][0].item() == pytest.approx(LN2)


def test_mutual_info_is_never_negative():
    logits = torch.randn(7, 6, 4, generator=gen(5))
    measures = uncertainty_measures(torch.softmax(logits, dim=-1), probabilities=True)
    assert (measures["mutual_info"] >= 0).all()
    assert measures["mutual_info"].shape == (6,)
    torch.testing.assert_close(
        measures["mutual_info"], measures["predictive_entropy"] - measures["expected_entropy"], atol=1e-6, rtol=0
    )


def test_extra_output_dims_give_per_row_entropies():
    probabilities = torch.softmax(torch.randn(3, 2, 5, 4, generator=gen(1)), dim=-1)
    measures = uncertainty_measures(probabilities, probabilities=True)
    assert measures["variance"].shape == (2, 5, 4)
    for key in ("predictive_entropy", "expected_entropy", "mutual_info"):
        assert measures[key].shape == (2,)


@pytest.mark.parametrize(("shape", "probabilities"), [((3,), False), ((0, 2), False), ((2, 3), True)])
def test_measures_reject_bad_shapes(shape, probabilities):
    with pytest.raises(ValueError):
        uncertainty_measures(torch.zeros(shape), probabilities=probabilities)


# --- SWAG maths ----------------------------------------------------------------------------------------------------


def test_swag_variance_clamps_degenerate_variance_to_the_floor():
    first = torch.tensor([1.0, 2.0, 0.0, 0.0, 3.0])
    second = torch.tensor([0.5, 4.0, 0.0, 2.0, 9.0])  # negative, zero, zero, 2, zero
    variance = swag_variance(first, second, floor=1e-12)
    torch.testing.assert_close(variance, torch.tensor([1e-12, 1e-12, 1e-12, 2.0, 1e-12]))
    assert not torch.isnan(swag_variance(first, second)).any()
    assert (swag_variance(first, second) > 0).all()


def test_swag_samples_with_degenerate_variance_are_finite_and_at_the_mean():
    first = torch.tensor([1.0, -2.0, 3.0])
    second = first**2 - torch.tensor([0.5, 0.0, 1.0])  # negative and zero variance
    for sample in sample_swag_weights(first, second, 5, gen()):
        assert torch.isfinite(sample).all()
        torch.testing.assert_close(sample, first)


def test_swag_samples_differ_from_each_other_and_are_separate_tensors():
    first = torch.zeros(10)
    second = torch.ones(10)
    samples = sample_swag_weights(first, second, 3, gen())
    assert len(samples) == 3
    assert all(sample.shape == first.shape and sample.dtype == first.dtype for sample in samples)
    assert not torch.equal(samples[0], samples[1])
    assert not torch.equal(samples[1], samples[2])
    samples[0].fill_(7.0)
    assert not torch.equal(samples[1], samples[0])


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_swag_samples_have_the_right_mean_and_variance(scale):
    first = torch.tensor([0.0, 1.0, -2.0, 5.0, 0.5])
    variance = torch.tensor([0.5, 1.0, 2.0, 0.1, 3.0])
    second = variance + first**2
    draws = torch.stack(sample_swag_weights(first.double(), second.double(), 4000, gen(7), scale=scale))
    torch.testing.assert_close(draws.mean(dim=0).float(), first, atol=0.1, rtol=0)
    torch.testing.assert_close(draws.var(dim=0).float(), scale * variance, rtol=0.1, atol=0)
    # independent draws: no correlation between consecutive draws or between coordinates
    standardised = (draws - first.double()) / (scale * variance.double()).sqrt()
    assert abs((standardised[1:] * standardised[:-1]).mean().item()) < 0.05
    assert abs((standardised[:, 0] * standardised[:, 1]).mean().item()) < 0.1


def test_swag_samples_are_reproducible_for_a_seed():
    first = torch.randn(20, generator=gen(1))
    second = first**2 + 0.5
    same_a = sample_swag_weights(first, second, 4, gen(3))
    same_b = sample_swag_weights(first, second, 4, gen(3))
    other = sample_swag_weights(first, second, 4, gen(4))
    for a, b, c in zip(same_a, same_b, other, strict=True):
        assert torch.equal(a, b)
        assert not torch.equal(a, c)


@pytest.mark.parametrize(
    ("first", "second", "n"),
    [
        (torch.zeros(3), torch.ones(4), 2),
        (torch.zeros(2, 2), torch.ones(2, 2), 2),
        (torch.tensor([0.0, float("nan")]), torch.ones(2), 2),
        (torch.zeros(2), torch.tensor([1.0, float("inf")]), 2),
        (torch.zeros(2), torch.ones(2), 0),
        (torch.zeros(2), torch.ones(2), True),
        (torch.zeros(2, dtype=torch.int64), torch.ones(2, dtype=torch.int64), 2),
    ],
)
def test_sample_swag_weights_validates_its_input(first, second, n):
    with pytest.raises(ValueError):
        sample_swag_weights(first, second, n, gen())


@pytest.mark.parametrize(("floor", "scale"), [(-1.0, 1.0), (float("nan"), 1.0), (1e-30, -0.5), (1e-30, math.inf)])
def test_sample_swag_weights_validates_floor_and_scale(floor, scale):
    with pytest.raises(ValueError):
        sample_swag_weights(torch.zeros(2), torch.ones(2), 1, gen(), floor=floor, scale=scale)


@pytest.mark.parametrize("script", [False, True])
def test_assign_and_flatten_round_trip_in_parameters_order(script):
    module = plain_net()
    module = scripted(module) if script else module
    parameters = list(module.parameters())
    total = sum(parameter.numel() for parameter in parameters)
    flat = torch.arange(total, dtype=torch.float32)
    assign_flat_parameters(module, flat)
    offset = 0
    for parameter in parameters:
        expected = flat[offset : offset + parameter.numel()].view_as(parameter)
        assert torch.equal(parameter.detach(), expected)
        assert parameter.requires_grad
        offset += parameter.numel()
    flattened = flatten_parameters(module)
    assert torch.equal(flattened, flat)
    assert not flattened.requires_grad
    flattened.zero_()  # a copy: the module keeps its weights
    assert torch.equal(flatten_parameters(module), flat)


@pytest.mark.parametrize("delta", [-1, 1])
def test_assign_rejects_a_wrong_number_of_values(delta):
    module = plain_net()
    before = flatten_parameters(module)
    with pytest.raises(ValueError, match="values"):
        assign_flat_parameters(module, torch.zeros(before.numel() + delta))
    assert torch.equal(flatten_parameters(module), before)


# --- methods -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", [False, True])
def test_mc_dropout_passes_differ_and_batch_norm_stays_in_eval(script):
    net = drop_net()
    module = scripted(net) if script else net
    before = bn_state(module)
    deterministic = NoUncertainty(module).predict(X, 1, False, gen())[0]
    method = MCDropout(module)
    mean, measures = method.predict(X, 20, False, gen())
    assert mean.shape == (5, 3)
    assert set(measures) == {"variance", "std"}
    assert (measures["variance"].sum(dim=1) > 0).all()  # the passes differ for every row
    assert not torch.allclose(mean, deterministic)
    after = bn_state(module)
    assert before.keys() == after.keys() and before
    for name in before:
        assert torch.equal(before[name], after[name]), name
    bn = module.bn
    assert not bn.training
    assert module.drop.training


@pytest.mark.parametrize("script", [False, True])
def test_mc_dropout_is_reproducible_for_a_generator_seed(script):
    net = drop_net()
    module = scripted(net) if script else net
    method = MCDropout(module)
    state = torch.get_rng_state()
    a = method.predict(X, 6, True, gen(11))
    b = method.predict(X, 6, True, gen(11))
    c = method.predict(X, 6, True, gen(12))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    assert torch.equal(a[0], b[0])
    for key in a[1]:
        assert torch.equal(a[1][key], b[1][key])
    assert not torch.equal(a[0], c[0])
    torch.testing.assert_close(a[0].sum(dim=-1), torch.ones(5))
    assert (a[1]["mutual_info"] > 0).all()


@pytest.mark.parametrize("dropout", [torch.nn.Dropout1d, torch.nn.AlphaDropout, torch.nn.FeatureAlphaDropout])
@pytest.mark.parametrize("script", [False, True])
def test_mc_dropout_detects_other_dropout_layers(dropout, script):
    net = drop_net(dropout=dropout)
    module = scripted(net) if script else net
    _, measures = MCDropout(module).predict(X, 8, False, gen())
    assert measures["variance"].sum() > 0


def test_mc_dropout_resets_the_modes_if_someone_changes_them():
    net = drop_net()
    method = MCDropout(net)
    net.train()
    before = bn_state(net)
    method.predict(X, 3, False, gen())
    assert not net.bn.training and net.drop.training
    assert all(torch.equal(before[name], value) for name, value in bn_state(net).items())


@pytest.mark.parametrize("script", [False, True])
def test_mc_dropout_without_dropout_layers_is_an_error(script):
    module = plain_net()
    with pytest.raises(ValueError, match="MC dropout needs dropout layers"):
        MCDropout(scripted(module) if script else module)


@pytest.mark.parametrize("n", [0, -1, True, 2.0])
def test_sampling_methods_reject_bad_n(n):
    with pytest.raises(ValueError, match="N"):
        MCDropout(drop_net()).predict(X, n, False, gen())


@pytest.mark.parametrize("softmax", [False, True])
def test_ensemble_mean_and_variance_are_over_the_members(softmax):
    members = [plain_net(seed).eval() for seed in range(3)]
    outputs = torch.stack([member(X).detach() for member in members])
    if softmax:
        outputs = torch.softmax(outputs, dim=-1)
    mean, measures = Ensemble(members).predict(X, 1, softmax, gen())  # n ignored: every member
    torch.testing.assert_close(mean, outputs.mean(dim=0))
    torch.testing.assert_close(measures["variance"], outputs.var(dim=0, correction=0))
    torch.testing.assert_close(measures["std"], outputs.std(dim=0, correction=0))
    assert (measures["variance"] > 0).any()
    if softmax:
        torch.testing.assert_close(mean.sum(dim=-1), torch.ones(5))
        assert (measures["mutual_info"] > 0).all()
    else:
        assert "mutual_info" not in measures


def test_identical_ensemble_members_do_not_disagree():
    members = [plain_net(4), plain_net(4)]
    _, measures = Ensemble(members).predict(X, 2, True, gen())
    torch.testing.assert_close(measures["variance"], torch.zeros(5, 3))
    torch.testing.assert_close(measures["mutual_info"], torch.zeros(5))


def test_empty_ensemble_is_an_error():
    with pytest.raises(ValueError):
        Ensemble([])


@pytest.mark.parametrize("script", [False, True])
def test_swag_with_zero_variance_is_the_deterministic_prediction(script):
    net = drop_net()
    module = scripted(net) if script else net
    expected = NoUncertainty(module).predict(X, 1, False, gen())[0]
    first = flatten_parameters(module)
    weights_before = first.clone()
    mean, measures = SWAG(module, first, first**2).predict(X, 5, False, gen())
    torch.testing.assert_close(mean, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(measures["variance"], torch.zeros(5, 3), atol=1e-10, rtol=0)
    assert torch.equal(flatten_parameters(module), weights_before)


@pytest.mark.parametrize("script", [False, True])
def test_swag_samples_spread_the_prediction_and_leave_the_module_alone(script):
    net = plain_net()
    module = scripted(net) if script else net
    first = flatten_parameters(module)
    second = first**2 + 0.01
    method = SWAG(module, first, second)
    a = method.predict(X, 10, True, gen(1))
    b = method.predict(X, 10, True, gen(1))
    c = method.predict(X, 10, True, gen(2))
    assert (a[1]["variance"] > 0).all()
    assert (a[1]["mutual_info"] > 0).all()
    torch.testing.assert_close(a[0].sum(dim=-1), torch.ones(5))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    assert torch.equal(flatten_parameters(module), first)
    wider = SWAG(module, first, second, scale=4.0).predict(X, 10, True, gen(1))
    assert wider[1]["variance"].mean() > a[1]["variance"].mean()


def test_swag_rejects_moments_of_the_wrong_size():
    module = plain_net()
    first = flatten_parameters(module)
    with pytest.raises(ValueError, match="moment"):
        SWAG(module, first[:-1], first[:-1] ** 2)


def test_no_uncertainty_is_one_eval_pass_without_measures():
    net = drop_net()
    net.train()
    method = NoUncertainty(net)
    logits, measures = method.predict(X, 7, False, gen())
    assert measures == {}
    torch.testing.assert_close(logits, net.eval()(X).detach())
    probabilities, measures = method.predict(X, 7, True, gen())
    assert measures == {}
    torch.testing.assert_close(probabilities, torch.softmax(logits, dim=-1))
    torch.testing.assert_close(probabilities.sum(dim=-1), torch.ones(5))


def test_softmax_needs_a_class_dim():
    one_output = torch.nn.Sequential(torch.nn.Linear(4, 1), torch.nn.Flatten(0))
    with pytest.raises(ValueError, match="softmax"):
        NoUncertainty(one_output).predict(X, 1, True, gen())


def test_method_for_builds_each_method_by_name():
    net = drop_net()
    first = flatten_parameters(net)
    assert isinstance(method_for("NONE", module=net), NoUncertainty)
    assert isinstance(method_for("MC_DROPOUT", module=net), MCDropout)
    assert isinstance(method_for("ENSEMBLE", members=[net, drop_net(1)]), Ensemble)
    assert isinstance(method_for("SWAG", module=net, first=first, second=first**2 + 1), SWAG)
    assert [cls.name for cls in (NoUncertainty, Ensemble, MCDropout, SWAG)] == [
        "NONE",
        "ENSEMBLE",
        "MC_DROPOUT",
        "SWAG",
    ]


@pytest.mark.parametrize("name", ["", "none", "DROPOUT", "Swag", None])
def test_method_for_rejects_unknown_names(name):
    with pytest.raises(ValueError, match="unknown uncertainty method"):
        method_for(name, module=drop_net())


# --- purity --------------------------------------------------------------------------------------------------------


def test_uncertainty_package_does_not_import_django():
    code = (
        "import sys, fl_server_ai.uncertainty; "
        "bad = sorted(m for m in sys.modules if m == 'django' or m.startswith(('django.', 'rest_framework'))); "
        "assert not bad, bad"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
