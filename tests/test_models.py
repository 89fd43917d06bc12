import pytest
import torch

from mri_platform.models import DenoisingAutoencoder, ModelConfig, build_model, num_parameters


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


def test_wrong_input_shape_says_what_was_expected():
    with pytest.raises(ValueError, match="divisible by 4"):
        DenoisingAutoencoder(filters=4)(torch.rand(1, 1, 30, 30))


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
