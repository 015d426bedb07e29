"""Reference unimodal encoders in plain torch, picked from a string-keyed registry.

An encoder factory is `factory(input_shape, out_dim, **kwargs) -> nn.Module`; the module maps
a batch `[B, *input_shape]` to features `[B, out_dim]`. Register your own with
`register_encoder("name", factory)` and name it per modality (`encoders={"audio": "name"}`).

Built in:
- `mlp`: vectors (any shape is flattened), in -> 128 -> out_dim with ReLU.
- `small_cnn`: three 3x3 convolutions for small images such as 8x8 digits.
- `resnet18`: ResNet-18 (BasicBlock [2, 2, 2, 2], 64-128-256-512 channels) for spectrograms
  `[1, F, T]`, frames `[C, H, W]` and clips `[T, C, H, W]` (time folded into the batch, the
  per-frame features averaged over time, as the MIDAS / OGM-GE code does for visual frames).

Input layouts for the conv encoders: `[H, W]` (one channel added), `[C, H, W]`, `[T, C, H, W]`.
`train_unimodal` and `embed` train and apply a `UnimodalModel` on in-memory tensors.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from midas_data.progress import progress_bar as tqdm

EncoderFactory = Callable[..., nn.Module]
_REGISTRY: dict[str, EncoderFactory] = {}
SMALL_IMAGE_SIDE = 32  # images no larger than this get `small_cnn` by default


def register_encoder(name: str, factory: EncoderFactory, *, overwrite: bool = False) -> None:
    """Make `factory(input_shape, out_dim, **kwargs) -> nn.Module` available as `name`."""
    if not name or not isinstance(name, str):
        raise ValueError("encoder name must be a non-empty string")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"encoder {name!r} is already registered; pass overwrite=True to replace it")
    if not callable(factory):
        raise TypeError(f"encoder factory for {name!r} is not callable")
    _REGISTRY[name] = factory


def available_encoders() -> list[str]:
    return sorted(_REGISTRY)


def build_encoder(name: str, input_shape: Sequence[int], out_dim: int, **kwargs) -> nn.Module:
    """Instantiate registered encoder `name` for inputs `[B, *input_shape]` -> `[B, out_dim]`."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown encoder {name!r}; registered: {available_encoders()} "
                       "(add yours with midas_data.features.encoders.register_encoder)")
    return _REGISTRY[name](tuple(int(s) for s in input_shape), int(out_dim), **kwargs)


def default_encoder_for(kind: str, shape: Sequence[int] | None) -> str:
    """The built-in encoder for a modality of `kind` whose decoded samples have `shape`.

    Vectors -> `mlp`; images or 2-D/3-D/4-D tensors no larger than 32x32 -> `small_cnn`;
    larger ones and audio (turned into a spectrogram) -> `resnet18`. Text has no default.
    """
    if kind == "text":
        raise ValueError("there is no built-in text encoder; bring your own features "
                         "(source='user') or register an encoder that takes tensors")
    if kind == "audio":
        return "resnet18"
    shape = tuple(shape or ())
    if len(shape) <= 1:
        return "mlp"
    spatial = shape[:2] if kind == "image" else shape[-2:]
    return "small_cnn" if max(spatial) <= SMALL_IMAGE_SIDE else "resnet18"


class UnimodalModel(nn.Module):
    """An encoder and a linear head on its features; `forward(x) -> (features, logits)`."""

    def __init__(self, encoder: nn.Module, feature_dim: int, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.encoder(x)
        return f, self.head(f)


class Standardize(nn.Module):
    """`(x - mean) / std` with train-split statistics kept as buffers (saved in the state dict)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).clone())
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


# ---------------------------------------------------------------- mlp
class MLPEncoder(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, hidden: Sequence[int] = (128,), dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        for h in (*hidden, out_dim):
            layers += [nn.Linear(in_dim, h), nn.ReLU()]
            if dropout > 0 and h != out_dim:
                layers.append(nn.Dropout(dropout))
            in_dim = h
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


def _mlp(input_shape: tuple[int, ...], out_dim: int, hidden: Sequence[int] = (128,),
         dropout: float = 0.0) -> nn.Module:
    in_dim = 1
    for s in input_shape:
        in_dim *= s
    return MLPEncoder(in_dim, out_dim, hidden, dropout)


# ---------------------------------------------------------------- conv helpers
def _frame_layout(input_shape: tuple[int, ...]) -> tuple[int, int]:
    """(channels, number of sample dims) for [H, W], [C, H, W] or [T, C, H, W] inputs."""
    if len(input_shape) == 2:
        return 1, 2
    if len(input_shape) in (3, 4):
        return input_shape[-3], len(input_shape)
    raise ValueError(f"conv encoders take [H, W], [C, H, W] or [T, C, H, W] inputs, got {input_shape}")


class FramePooled(nn.Module):
    """Apply a per-frame 2-D network `[N, C, H, W] -> [N, D]`, folding time into the batch.

    `[B, H, W]` gets a channel axis; `[B, T, C, H, W]` runs on B*T frames and the frame
    features are averaged over T.
    """

    def __init__(self, backbone: nn.Module, sample_dims: int):
        super().__init__()
        self.backbone = backbone
        self.sample_dims = sample_dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.sample_dims + 1:
            raise ValueError(f"expected a batch with {self.sample_dims} sample dims, got {tuple(x.shape)}")
        if self.sample_dims == 2:
            return self.backbone(x.unsqueeze(1))
        if self.sample_dims == 3:
            return self.backbone(x)
        b, t = x.shape[:2]
        return self.backbone(x.flatten(0, 1)).view(b, t, -1).mean(dim=1)


def _project(in_dim: int, out_dim: int) -> nn.Module:
    return nn.Identity() if in_dim == out_dim else nn.Sequential(nn.Linear(in_dim, out_dim), nn.ReLU())


# ---------------------------------------------------------------- small_cnn
def _small_cnn(input_shape: tuple[int, ...], out_dim: int, width: int = 32) -> nn.Module:
    c, dims = _frame_layout(input_shape)
    net = nn.Sequential(
        nn.Conv2d(c, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(2 * width, out_dim), nn.ReLU(),
    )
    return FramePooled(net, dims)


# ---------------------------------------------------------------- resnet18
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 trunk `[N, in_channels, H, W] -> [N, 512]` (global average pooled)."""

    def __init__(self, in_channels: int = 3, widths: Sequence[int] = (64, 128, 256, 512),
                 blocks: Sequence[int] = (2, 2, 2, 2)):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=False), nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        layers, cin = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                layers.append(BasicBlock(cin, w, stride=2 if (i > 0 and j == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = cin
        for mod in self.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.layers(self.stem(x))).flatten(1)


def _resnet18(input_shape: tuple[int, ...], out_dim: int) -> nn.Module:
    c, dims = _frame_layout(input_shape)
    trunk = ResNet18(in_channels=c)
    return FramePooled(nn.Sequential(trunk, _project(trunk.out_dim, out_dim)), dims)


# ---------------------------------------------------------------- training helpers
def _batches(n: int, batch_size: int) -> list[tuple[int, int]]:
    """Batch bounds; a trailing batch of one joins the previous (BatchNorm needs two)."""
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    return [(s, starts[i + 1] if i + 1 < len(starts) else n) for i, s in enumerate(starts)]


def state_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict's names, dtypes, shapes and bytes, in key order."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def train_unimodal(x: torch.Tensor, y: torch.Tensor, model: UnimodalModel, epochs: int,
                   batch_size: int, lr: float, seed: int, optimizer: str = "adam",
                   device: torch.device | str = "cpu", desc: str = "warm-up",
                   progress: bool = False) -> list[dict]:
    """Train `model` with cross-entropy on (x, y); returns per-epoch loss and accuracy."""
    device = torch.device(device)
    model.to(device)
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    history = []
    bar = tqdm(range(epochs), desc=desc, unit="epoch", disable=not progress)
    for _ in bar:
        model.train()
        perm = torch.randperm(len(y), generator=g)
        tot_loss, correct = 0.0, 0
        for lo, hi in _batches(len(y), batch_size):
            idx = perm[lo:hi]
            xb, yb = x[idx].to(device), y[idx].to(device)
            _, logits = model(xb)
            loss = torch.nn.functional.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot_loss += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
        history.append({"loss": tot_loss / max(len(y), 1), "acc": correct / max(len(y), 1)})
        bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", acc=f"{history[-1]['acc']:.3f}")
    return history


@torch.no_grad()
def embed(model: UnimodalModel, x: torch.Tensor, y: np.ndarray, batch_size: int = 256,
          device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Features float32 [n, d] and confidences softmax(logits)[y] float32 [n] in eval mode."""
    model.eval()
    fs, cs = [], []
    for lo in range(0, len(y), batch_size):
        f, logits = model(x[lo:lo + batch_size].to(device))
        p = torch.softmax(logits.float(), dim=1).cpu()
        fs.append(f.float().cpu())
        cs.append(p[torch.arange(len(p)), torch.from_numpy(y[lo:lo + batch_size])])
    d = model.head.in_features
    feats = torch.cat(fs).numpy() if fs else np.zeros((0, d), np.float32)
    return feats, (torch.cat(cs).numpy() if cs else np.zeros(0, np.float32))


register_encoder("mlp", _mlp)
register_encoder("small_cnn", _small_cnn)
register_encoder("resnet18", _resnet18)
