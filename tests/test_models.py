import pytest
import torch

from mri_platform.checkpoints import applies_natively, load_checkpoint, save_checkpoint
from mri_platform.models import NAMED, DenoisingAutoencoder, ModelConfig, build_model, num_parameters


@pytest.mark.parametrize(("name", "expected"), [("ae1", 112_001), ("ae2", 1_775_105)])
def test_report_models_have_the_reports_parameter_counts(name, expected):
    assert num_parameters(build_model(ModelConfig.named(name))) == expected


def test_output_matches_input_shape_and_lies_in_unit_range():
    model = DenoisingAutoencoder(filters=4)
    x = torch.rand(3, 1, 32, 32)
    y = model(x)
    assert y.shape == x.shape
    assert y.min() >= 0 and y.max() <= 1


def test_channels_last_gives_the_same_output():
    model = DenoisingAutoencoder(filters=8).eval()
    x = torch.rand(2, 1, 32, 32)
    expected = model(x)
    fast = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(fast, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("name", "low", "high"), [("dncnn", 400_000, 600_000), ("unet", 300_000, 2_000_000)])
def test_the_residual_nets_keep_their_parameter_budget(name, low, high):
    assert low <= num_parameters(build_model(ModelConfig.named(name))) <= high


@pytest.mark.parametrize("name", sorted(NAMED))
@pytest.mark.parametrize("shape", [(2, 1, 37, 53), (1, 1, 64, 64), (1, 1, 9, 130)])
def test_every_network_denoises_any_size_and_gives_the_same_shape_back(name, shape):
    model = build_model(ModelConfig.named(name, filters=8)).eval()
    x = torch.rand(*shape)
    y = model(x)
    assert y.shape == x.shape
    assert y.min() >= 0 and y.max() <= 1


def test_padding_does_not_change_the_interior():
    """A residual net padded to its stride gives the same answer on an image as on the same image padded by hand
    (away from the border), so cropping back loses nothing."""
    torch.manual_seed(0)
    model = build_model(ModelConfig.named("unet", filters=8)).eval()
    x = torch.rand(1, 1, 61, 61)
    padded = torch.nn.functional.pad(x, (0, 3, 0, 3), mode="replicate")
    torch.testing.assert_close(model(x), model(padded)[..., :61, :61], atol=1e-5, rtol=1e-4)


def test_wrong_input_rank_says_what_was_expected():
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        DenoisingAutoencoder(filters=4)(torch.rand(1, 30, 30))


@pytest.mark.parametrize(("kwargs", "message"), [({"architecture": "gan"}, "architecture"),
                                                 ({"name": "unet", "architecture": "unet", "depth": 0, "filters": 0},
                                                  "filters"), ({"name": "custom", "depth": 3}, "depth")])  # fmt: skip
def test_impossible_models_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


@pytest.mark.parametrize("name", sorted(NAMED))
def test_a_checkpoint_rebuilds_every_model_and_says_where_it_applies(name, tmp_path):
    model = build_model(ModelConfig.named(name, filters=8)).eval()
    path = save_checkpoint(tmp_path / "checkpoint.pt", model, data={"size": 64, "patch": None}, epoch=1)
    loaded, meta = load_checkpoint(path)
    x = torch.rand(1, 1, 40, 48)
    torch.testing.assert_close(loaded(x), model(x))
    assert type(loaded) is type(model) and meta["model"]["architecture"] == NAMED[name][0]
    assert applies_natively(meta) == (name not in ("ae1", "ae2"))  # the report's models stay at 64 x 64
    assert applies_natively({**meta, "data": {"size": "native", "patch": 64}})


def test_a_checkpoint_from_before_the_zoo_still_loads():
    config = ModelConfig(**{"name": "ae1", "filters": 64, "channels": 1})  # what older checkpoints hold
    assert config.architecture == "autoencoder" and num_parameters(build_model(config)) == 112_001


def test_unknown_model_and_bad_width_are_refused():
    with pytest.raises(ValueError, match="unknown model"):
        ModelConfig.named("ae3")
    assert ModelConfig.named("ae3", filters=32).filters == 32
    with pytest.raises(ValueError):
        ModelConfig(filters=0)


def test_a_few_steps_reduce_the_denoising_loss():
    torch.manual_seed(0)
    model = DenoisingAutoencoder(filters=8)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    ramp = torch.linspace(0, 1, 16)
    clean = (ramp[None, :] * ramp[:, None]).expand(8, 1, 16, 16)  # a smooth fixed batch to fit
    losses = []
    for _ in range(60):
        loss = torch.nn.functional.mse_loss(model(clean), clean)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
