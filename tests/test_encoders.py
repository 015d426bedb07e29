"""Reference encoders: output shapes, gradient flow, architecture facts, registry, training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from midas_data.features.encoders import (
    BasicBlock,
    ResNet18,
    UnimodalModel,
    available_encoders,
    build_encoder,
    default_encoder_for,
    embed,
    register_encoder,
    state_fingerprint,
    train_unimodal,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _grads_reach_every_parameter(model: nn.Module, x: torch.Tensor, num_classes: int = 3) -> None:
    um = UnimodalModel(model, 16, num_classes)
    f, logits = um(x)
    assert f.shape == (x.shape[0], 16) and logits.shape == (x.shape[0], num_classes)
    torch.nn.functional.cross_entropy(logits, torch.arange(x.shape[0]) % num_classes).backward()
    for name, p in um.named_parameters():
        assert p.grad is not None, f"no gradient reached {name}"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"zero gradient at {name}"


@pytest.mark.parametrize("shape", [(216,), (6,), (4, 5)])
def test_mlp_maps_vectors_to_out_dim_and_trains_end_to_end(shape):
    torch.manual_seed(0)
    enc = build_encoder("mlp", shape, 16)
    x = torch.randn(5, *shape)
    assert enc(x).shape == (5, 16)
    _grads_reach_every_parameter(enc, x)


def test_mlp_default_is_in_128_out_with_optional_dropout():
    enc = build_encoder("mlp", (10,), 64)
    linears = [m for m in enc.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(10, 128), (128, 64)]
    assert not any(isinstance(m, nn.Dropout) for m in enc.modules())
    enc = build_encoder("mlp", (10,), 8, hidden=(32, 16), dropout=0.5)
    linears = [m for m in enc.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(10, 32), (32, 16), (16, 8)]
    assert sum(isinstance(m, nn.Dropout) for m in enc.modules()) == 2


@pytest.mark.parametrize("shape", [(8, 8), (1, 8, 8), (3, 8, 8), (2, 3, 8, 8), (1, 5, 7)])
def test_small_cnn_shapes_and_gradients(shape):
    torch.manual_seed(0)
    enc = build_encoder("small_cnn", shape, 16)
    x = torch.randn(4, *shape)
    assert enc(x).shape == (4, 16)
    _grads_reach_every_parameter(enc, x)


@pytest.mark.parametrize("shape", [(1, 40, 24), (3, 32, 32), (2, 3, 32, 32), (20, 16)])
def test_resnet18_spectrograms_frames_and_clips(shape):
    torch.manual_seed(0)
    enc = build_encoder("resnet18", shape, 16)
    x = torch.randn(3, *shape)
    assert enc(x).shape == (3, 16)
    _grads_reach_every_parameter(enc, x)


def test_resnet18_is_the_standard_architecture():
    trunk = ResNet18(in_channels=3)
    blocks = [m for m in trunk.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 8
    assert [b.conv2.out_channels for b in blocks] == [64, 64, 128, 128, 256, 256, 512, 512]
    # torchvision's resnet18 has 11,689,512 parameters, 513,000 of them in the 1000-way fc
    assert sum(p.numel() for p in trunk.parameters()) == 11_689_512 - 513_000
    assert trunk(torch.randn(2, 3, 64, 64)).shape == (2, 512)
    assert ResNet18(in_channels=1).stem[0].in_channels == 1
    enc = build_encoder("resnet18", (1, 32, 32), 512)  # no projection when out_dim is 512
    assert not any(isinstance(m, nn.Linear) for m in enc.modules())


@pytest.mark.parametrize("name", ["resnet18", "small_cnn"])
def test_clip_features_are_the_time_average_of_frame_features(name):
    torch.manual_seed(0)
    clip = build_encoder(name, (3, 3, 16, 16), 8).eval()
    frame = build_encoder(name, (3, 16, 16), 8).eval()
    frame.load_state_dict(clip.state_dict())
    x = torch.randn(2, 3, 3, 16, 16)
    per_frame = torch.stack([frame(x[:, t]) for t in range(3)], dim=1)
    torch.testing.assert_close(clip(x), per_frame.mean(dim=1), rtol=1e-5, atol=1e-5)


def test_conv_encoders_refuse_wrong_layouts():
    with pytest.raises(ValueError, match="inputs"):
        build_encoder("small_cnn", (64,), 8)
    enc = build_encoder("small_cnn", (1, 8, 8), 8)
    with pytest.raises(ValueError, match="sample dims"):
        enc(torch.randn(2, 8, 8))


@pytest.mark.parametrize("kind,shape,expect", [
    ("tensor", (216,), "mlp"), ("tensor", (), "mlp"), ("tensor", (8, 8), "small_cnn"),
    ("image", (8, 8, 1), "small_cnn"), ("image", (224, 224, 3), "resnet18"),
    ("tensor", (1, 257, 188), "resnet18"), ("tensor", (3, 3, 224, 224), "resnet18"),
    ("audio", (1, 16000), "resnet18"),
])
def test_default_encoder_for_kind_and_shape(kind, shape, expect):
    assert default_encoder_for(kind, shape) == expect


def test_default_encoder_for_text_says_what_to_do():
    with pytest.raises(ValueError, match="source='user'"):
        default_encoder_for("text", None)


def test_user_encoders_plug_in_by_name():
    def factory(input_shape, out_dim, scale=1.0):
        return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], out_dim))

    register_encoder("test_linear", factory, overwrite=True)
    assert "test_linear" in available_encoders()
    assert build_encoder("test_linear", (7,), 3, scale=2.0)(torch.randn(2, 7)).shape == (2, 3)
    with pytest.raises(ValueError, match="already registered"):
        register_encoder("test_linear", factory)
    with pytest.raises(KeyError, match="register_encoder"):
        build_encoder("no_such_encoder", (7,), 3)


def _toy(n=64, d=6, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % c
    x = torch.randn(n, d, generator=g) + 3.0 * nn.functional.one_hot(y, d).float()
    return x, y


def test_train_unimodal_learns_and_is_deterministic_for_a_seed():
    x, y = _toy()
    runs = []
    for _ in range(2):
        torch.manual_seed(1)
        model = UnimodalModel(build_encoder("mlp", (6,), 16, dropout=0.1), 16, 3)
        hist = train_unimodal(x, y, model, epochs=15, batch_size=16, lr=1e-2, seed=3)
        runs.append((hist, state_fingerprint(model.state_dict()), embed(model, x, y.numpy())))
    assert runs[0][0] == runs[1][0] and runs[0][1] == runs[1][1]
    assert runs[0][0][-1]["loss"] < runs[0][0][0]["loss"] and runs[0][0][-1]["acc"] > 0.9
    feats, conf = runs[0][2]
    assert feats.shape == (64, 16) and conf.shape == (64,) and conf.mean() > 0.8


def test_batchnorm_encoders_survive_a_trailing_batch_of_one():
    x, y = torch.randn(5, 1, 8, 8), torch.tensor([0, 1, 0, 1, 0])
    model = UnimodalModel(build_encoder("resnet18", (1, 8, 8), 8), 8, 2)
    hist = train_unimodal(x, y, model, epochs=1, batch_size=4, lr=1e-3, seed=0)
    assert len(hist) == 1
