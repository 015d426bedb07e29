"""Text encoders for the image-text readers (Food-101, MM-IMDB): the plug point.

Importing this module registers `tiny_text_transformer` in `midas_data.features.encoders`: a small,
randomly initialised transformer over UTF-8 byte tokens (for tests and smoke runs; the MIDAS
authors use BERT on Food-101). Its `forward` takes a batch of strings (`list[str]`) or byte
tokens (`[B, L]` integers, 0 = padding, e.g. the `text_format="bytes"` payload of the
readers) and returns features `[B, out_dim]`.

Your own pretrained model, from a local path (nothing is downloaded):
```
from midas_data.pipelines.text_encoder import register_pretrained_text_encoder
register_pretrained_text_encoder("my_bert", "weights.pt", module_factory=make_model)  # state dict
register_pretrained_text_encoder("my_ts", "model.ts")                                  # TorchScript
# then: encoders={"text": "my_bert"}
```
A state dict is read with `torch.load(weights_only=True)` (no pickled code runs) into
`module_factory(input_shape, out_dim, **kwargs)`; without a factory, a `.pt2` file is loaded
with `torch.export.load` (an exported program: it takes token tensors, not strings) and any
other file with `torch.jit.load` (TorchScript). Only load files you trust. Give `feature_dim` when the model's output
width differs from `out_dim`: a trainable linear layer then projects it.

Note: the reference trainer and warm-up standardise every tensor input before the encoder;
token inputs must reach this encoder unstandardised, so it refuses non-integral float
inputs with an error that says so rather than embedding scaled tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from midas_data.features.encoders import available_encoders, register_encoder

PAD = 0
VOCAB = 256  # byte values; byte 0 doubles as padding (NUL does not occur in text)


def text_to_bytes(texts: Sequence[str], max_len: int) -> np.ndarray:
    """UTF-8 bytes of each text, truncated / zero-padded to `max_len`: uint8 `[B, max_len]`."""
    out = np.zeros((len(texts), max_len), np.uint8)
    for i, t in enumerate(texts):
        b = np.frombuffer(str(t).encode("utf-8")[:max_len], np.uint8)
        out[i, : len(b)] = b
    return out


def as_tokens(x: Sequence[str] | torch.Tensor | np.ndarray, max_len: int) -> torch.Tensor:
    """Byte tokens `[B, L]` int64 from strings, integer tokens, or integral float tokens."""
    if isinstance(x, str):
        raise TypeError("pass a batch of strings (a list), not one string")
    if isinstance(x, Sequence) and not isinstance(x, torch.Tensor | np.ndarray):
        return torch.from_numpy(text_to_bytes(x, max_len)).long()
    t = torch.as_tensor(x)
    t = t if t.is_floating_point() else t.long()
    if t.dim() != 2:
        raise ValueError(f"byte tokens must be [B, L], got {tuple(t.shape)}")
    if t.is_floating_point():
        if not bool(((t == t.round()) & (t >= 0) & (t < VOCAB)).all()):
            raise ValueError("tiny_text_transformer got non-integral float inputs: byte tokens "
                             "were standardised or scaled on the way; feed them raw")
    elif bool(((t < 0) | (t >= VOCAB)).any()):
        raise ValueError(f"byte tokens must lie in [0, {VOCAB})")
    return t[:, :max_len].long()


class TinyTextTransformer(nn.Module):
    """Byte embedding + learned positions -> transformer encoder -> masked mean -> linear."""

    def __init__(self, out_dim: int, max_len: int = 128, dim: int = 64, heads: int = 4,
                 layers: int = 2, ff: int = 128, dropout: float = 0.0):
        super().__init__()
        self.max_len = int(max_len)
        self.embed = nn.Embedding(VOCAB, dim, padding_idx=PAD)
        self.pos = nn.Parameter(torch.randn(self.max_len, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, ff, dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Sequential(nn.Linear(dim, out_dim), nn.ReLU())

    def forward(self, x: Sequence[str] | torch.Tensor) -> torch.Tensor:
        tok = as_tokens(x, self.max_len).to(self.pos.device)
        pad = tok == PAD
        pad[:, 0] &= ~pad.all(dim=1)  # an empty text attends to its first (padding) position
        h = self.embed(tok) + self.pos[: tok.shape[1]]
        h = self.encoder(h, src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        return self.out((h * keep).sum(1) / keep.sum(1).clamp(min=1.0))


def tiny_text_transformer(input_shape: tuple[int, ...], out_dim: int, **kwargs) -> nn.Module:
    """Encoder factory: `max_len` defaults to the token length of `[L]` inputs, else 128."""
    if "max_len" not in kwargs and len(input_shape) == 1 and input_shape[0] > 0:
        kwargs["max_len"] = input_shape[0]
    return TinyTextTransformer(out_dim, **kwargs)


class _Projected(nn.Module):
    def __init__(self, model: nn.Module, in_dim: int | None, out_dim: int):
        super().__init__()
        self.model, self.out_dim = model, out_dim
        self.proj = nn.Identity() if in_dim in (None, out_dim) else nn.Linear(in_dim, out_dim)

    def forward(self, x):
        f = self.proj(self.model(x))
        if f.dim() != 2 or f.shape[1] != self.out_dim:
            raise ValueError(f"text encoder returned {tuple(f.shape)}, expected [B, {self.out_dim}]; "
                             "pass feature_dim=<its output width> to add a projection")
        return f


def pretrained_text_encoder(path: str | Path, module_factory: Callable[..., nn.Module] | None = None,
                            *, feature_dim: int | None = None, strict: bool = True,
                            **factory_kwargs) -> Callable[..., nn.Module]:
    """An encoder factory that loads a local model: a state dict into `module_factory`'s
    module (`torch.load(weights_only=True)`), or, without a factory, an exported program
    (`.pt2`) or a TorchScript file."""
    path = Path(path)

    def factory(input_shape: tuple[int, ...], out_dim: int, **kwargs) -> nn.Module:
        if not path.is_file():
            raise FileNotFoundError(f"file {path}: pretrained text encoder not found")
        if module_factory is None and path.suffix == ".pt2":
            model = torch.export.load(str(path)).module()
        elif module_factory is None:
            model = torch.jit.load(str(path), map_location="cpu")
        else:
            model = module_factory(input_shape, feature_dim or out_dim, **{**factory_kwargs, **kwargs})
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
                state = state["state_dict"]
            model.load_state_dict(state, strict=strict)
        return _Projected(model, feature_dim, out_dim)

    return factory


def register_pretrained_text_encoder(name: str, path: str | Path,
                                     module_factory: Callable[..., nn.Module] | None = None,
                                     **kwargs) -> None:
    """Register a local pretrained text model under `name` (replacing an earlier one)."""
    register_encoder(name, pretrained_text_encoder(path, module_factory, **kwargs), overwrite=True)


if "tiny_text_transformer" not in available_encoders():
    register_encoder("tiny_text_transformer", tiny_text_transformer)
