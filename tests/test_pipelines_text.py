"""midas_data.pipelines.text_encoder: the tiny byte transformer and the pretrained-model plug point."""

from __future__ import annotations

import warnings

import pytest
import torch
from midas_data.pipelines import text_encoder as te

from midas_data.features.encoders import available_encoders, build_encoder


def test_tiny_text_transformer_is_registered_and_takes_strings():
    assert "tiny_text_transformer" in available_encoders()
    torch.manual_seed(0)
    enc = build_encoder("tiny_text_transformer", (), 16, max_len=24, dim=32, layers=1)
    out = enc(["apple pie", "", "très bon 🍰" * 10])
    assert out.shape == (3, 16) and torch.isfinite(out).all()
    tokens = torch.from_numpy(te.text_to_bytes(["apple pie", "", "très bon 🍰" * 10], 24))
    enc.eval()
    torch.testing.assert_close(enc(tokens), enc(["apple pie", "", "très bon 🍰" * 10]))
    torch.testing.assert_close(enc(tokens.float()), enc(tokens))  # a collated uint8 -> float batch
    # padding does not change the features of a text
    longer = build_encoder("tiny_text_transformer", (40,), 16, dim=32, layers=1)
    a = longer(torch.from_numpy(te.text_to_bytes(["abc"], 40)))
    b = longer(torch.from_numpy(te.text_to_bytes(["abc"], 40))[:, :10])
    torch.testing.assert_close(a, b)
    loss = enc(["x", "y"]).sum()
    loss.backward()
    assert enc.embed.weight.grad is not None


def test_tiny_text_transformer_refuses_standardised_tokens():
    enc = te.tiny_text_transformer((8,), 4)
    with pytest.raises(ValueError, match="standardised"):
        enc(torch.randn(2, 8))
    with pytest.raises(TypeError, match="batch of strings"):
        enc("one string")


def test_pretrained_state_dict_and_torchscript(tmp_path):
    torch.manual_seed(1)
    src = te.tiny_text_transformer((16,), 8, dim=16, layers=1, heads=2)
    torch.save(src.state_dict(), tmp_path / "w.pt")
    te.register_pretrained_text_encoder(
        "test_text_sd", tmp_path / "w.pt",
        module_factory=lambda shape, out, **kw: te.tiny_text_transformer(shape, out, **kw),
        dim=16, layers=1, heads=2)
    enc = build_encoder("test_text_sd", (16,), 8)
    src.eval()
    enc.eval()
    torch.testing.assert_close(enc(["hello"]), src(["hello"]))
    # a TorchScript model with another output width gets a trainable projection
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(torch.nn.Sequential(torch.nn.Linear(16, 5))).save(str(tmp_path / "m.ts"))
    te.register_pretrained_text_encoder("test_text_ts", tmp_path / "m.ts", feature_dim=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        out = build_encoder("test_text_ts", (16,), 8)(torch.randn(3, 16))
    assert out.shape == (3, 8)
    # an exported program (.pt2)
    lin = torch.nn.Linear(16, 8)
    torch.export.save(torch.export.export(lin, (torch.randn(2, 16),)), str(tmp_path / "m.pt2"))
    te.register_pretrained_text_encoder("test_text_ep", tmp_path / "m.pt2")
    x = torch.randn(2, 16)
    torch.testing.assert_close(build_encoder("test_text_ep", (16,), 8)(x), lin(x))
    te.register_pretrained_text_encoder("test_text_bad", tmp_path / "m.ts")
    with pytest.raises(ValueError, match="feature_dim"), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        build_encoder("test_text_bad", (16,), 8)(torch.randn(3, 16))
    te.register_pretrained_text_encoder("test_text_missing", tmp_path / "nope.pt", module_factory=None)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        build_encoder("test_text_missing", (16,), 8)
