"""Payload encoding and safe decoding per modality kind (tensor, image, audio, text).

Decoding never executes what it reads: `.npy` is loaded with allow_pickle=False, images
through Pillow with a pixel limit, audio through the stdlib `wave` module. Pickle
extensions are refused outright.
"""

from __future__ import annotations

import io
import json
import math
import os
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from midas_data.errors import SchemaError, UnsafeInputError, where

KINDS = {"tensor": ("npy",), "image": ("png", "jpg", "jpeg"), "audio": ("wav",), "text": ("txt",)}
EXT_TO_KIND = {ext: kind for kind, exts in KINDS.items() for ext in exts}
UNSAFE_EXTS = {"pyd", "pickle", "pkl", "pt", "pth", "mp", "msgpack"}
MAX_IMAGE_PIXELS = 64 * 1024 * 1024
MAX_PAYLOAD_BYTES = 1 << 30
NPY_MAGIC = b"\x93NUMPY"
# .npy headers: parsed (bytes -> shape, fortran, dtype, data offset) and written ((dtype,
# shape) -> bytes), each cache bounded
_NPY_HEADER_CACHE: dict[bytes, tuple[tuple[int, ...], bool, np.dtype, int]] = {}
_NPY_HEADER_CACHE_MAX = 1024  # distinct headers remembered; more are parsed every time
_NPY_SAVE_HEADERS: dict[tuple[np.dtype, tuple[int, ...]], bytes] = {}
_DTYPE_NAMES: dict[np.dtype, str] = {}


@dataclass(frozen=True)
class Encoded:
    """One encoded payload: its tar extension, bytes, and the schema facts it implies."""

    ext: str
    data: bytes
    kind: str
    dtype: str | None
    shape: tuple[int, ...] | None


def kind_of_ext(ext: str, *, file: object = None, key: object = None, field: object = None) -> str:
    ext = ext.lower().lstrip(".")
    if ext in UNSAFE_EXTS:
        raise UnsafeInputError(f"{where(file, key, field)}: '.{ext}' payloads can execute code "
                               "when decoded and are refused; convert them to .npy")
    if ext not in EXT_TO_KIND:
        raise SchemaError(f"{where(file, key, field)}: unsupported payload extension '.{ext}'; "
                          f"use one of {sorted(EXT_TO_KIND)}")
    return EXT_TO_KIND[ext]


def encode_array(x: np.ndarray, *, file: object = None, key: object = None,
                 field: object = None) -> Encoded:
    x = np.asarray(x)
    if x.dtype == object or x.dtype.hasobject:
        loc = where(file, key, field)
        raise SchemaError(f"{loc + ': ' if loc else ''}object arrays cannot be stored; use a numeric dtype")
    # C order always; reshape because ascontiguousarray turns a 0-d array into shape (1,)
    x = np.ascontiguousarray(x).reshape(x.shape)
    key = (x.dtype, x.shape)
    head = _NPY_SAVE_HEADERS.get(key)
    if head is None:  # np.save's header depends only on dtype and shape: write it once
        buf = io.BytesIO()
        np.save(buf, x, allow_pickle=False)
        data = buf.getvalue()
        if len(_NPY_SAVE_HEADERS) < _NPY_HEADER_CACHE_MAX:
            _NPY_SAVE_HEADERS[key] = data[:len(data) - x.nbytes]
    else:
        data = head + x.tobytes()
    name = _DTYPE_NAMES.get(x.dtype)
    if name is None:  # numpy computes dtype.name in Python: remember it
        name = x.dtype.name
        if len(_DTYPE_NAMES) < _NPY_HEADER_CACHE_MAX:
            _DTYPE_NAMES[x.dtype] = name
    return Encoded("npy", data, "tensor", name, x.shape)


def encode_value(value: object, *, key: str, field: str, base_dir: Path | None = None,
                 file: object = None) -> Encoded:
    """Encode a payload given inline (array, number, list, text) or as a file path.

    `file` names where an inline value came from (e.g. the manifest) in error messages.
    """
    if isinstance(value, np.ndarray | np.generic):
        return encode_array(np.asarray(value), file=file, key=key, field=field)
    if isinstance(value, bytes):
        raise SchemaError(f"{where(file, key, field)}: raw bytes need an extension; pass a file path")
    if isinstance(value, int | float) and not isinstance(value, bool):
        return encode_array(np.asarray([value], dtype=np.float32))
    if isinstance(value, list | tuple):
        return encode_array(_float_vector(value, file, key, field))
    if isinstance(value, str | os.PathLike):
        s = str(value)
        ext = Path(s).suffix.lower().lstrip(".")
        if ext and (ext in EXT_TO_KIND or ext in UNSAFE_EXTS):
            return encode_file(Path(s) if base_dir is None else base_dir / s, key=key, field=field)
        stripped = s.strip()
        if stripped.startswith("["):  # inline JSON vector, e.g. from a CSV cell
            try:
                parsed = json.loads(stripped)
            except ValueError as e:
                raise SchemaError(f"{where(file, key, field)}: inline vector is not valid JSON ({e})") from e
            return encode_array(_float_vector(parsed, file, key, field))
        return Encoded("txt", s.encode("utf-8"), "text", None, None)
    raise SchemaError(f"{where(file, key, field)}: cannot store a value of type {type(value).__name__}")


def _float_vector(value: object, file: object, key: object, field: object) -> np.ndarray:
    """An inline list as float32; ragged or non-numeric lists are a located SchemaError."""
    try:
        return np.asarray(value, dtype=np.float32)
    except (ValueError, TypeError) as e:
        raise SchemaError(f"{where(file, key, field)}: inline list is not a rectangular array of "
                          f"numbers ({e})") from e


def encode_file(path: Path, *, key: str, field: str) -> Encoded:
    """Read a payload file; its bytes are stored as they are (images, audio) or re-encoded (npy)."""
    ext = path.suffix.lower().lstrip(".")
    kind = kind_of_ext(ext, file=path, key=key, field=field)
    try:
        size = path.stat().st_size
        if size > MAX_PAYLOAD_BYTES:
            raise SchemaError(f"{where(path, key, field)}: payload of {size} bytes exceeds the "
                              f"{MAX_PAYLOAD_BYTES}-byte limit")
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise SchemaError(f"{where(path, key, field)}: payload file does not exist") from e
    except (OSError, ValueError) as e:  # ValueError: a path with a NUL byte
        raise SchemaError(f"{where(path, key, field)}: payload file is unreadable ({e})") from e
    value = decode(kind, ext, data, file=path, key=key, field=field)
    if kind == "tensor":
        return encode_array(value)
    if kind == "text":
        return Encoded("txt", data, "text", None, None)
    ext = "jpg" if ext == "jpeg" else ext
    return Encoded(ext, data, kind, value.dtype.name, tuple(value.shape))


def decode(kind: str, ext: str, data: bytes, *, file: object = None, key: object = None,
           field: object = None) -> np.ndarray | str:
    """Decode payload bytes into an array (tensor, image HxWxC uint8, audio float32) or str.

    Untrusted bytes: whatever the decoding library raises (Pillow and `wave` raise many
    kinds of exceptions on damaged input) becomes a SchemaError that names file, key, field.
    """
    try:
        if kind == "tensor":
            return _decode_npy(data)
        if kind == "text":
            return data.decode("utf-8")
        if kind == "image":
            return _decode_image(data, ext)
        if kind == "audio":
            return _decode_wav(data)
    except Exception as e:  # any failure to decode untrusted bytes is a data error
        raise SchemaError(f"{where(file, key, field)}: cannot decode {kind} payload "
                          f"'.{ext}' ({type(e).__name__}: {e})") from e
    raise SchemaError(f"{where(file, key, field)}: unknown modality kind {kind!r}")


def npy_header(data: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran_order, dtype, data offset) from the start of `.npy` bytes, without
    pickle; object dtypes and negative shapes are refused (ValueError)."""
    fmt = np.lib.format
    buf = io.BytesIO(data)
    version = fmt.read_magic(buf)
    if version == (1, 0):
        shape, fortran, dtype = fmt.read_array_header_1_0(buf)
    elif version == (2, 0):
        shape, fortran, dtype = fmt.read_array_header_2_0(buf)
    else:
        raise ValueError(f".npy format version {version} is not supported")
    if dtype.hasobject:
        raise ValueError("object arrays cannot be loaded without pickle and are refused")
    if any(d < 0 for d in shape):
        raise ValueError(f"header claims a negative shape {shape}")
    return shape, fortran, dtype, buf.tell()


def npy_header_len(data: bytes | memoryview) -> int:
    """Length of the magic string plus header of `.npy` bytes (where the data starts), read
    from the fixed-size prefix only; ValueError if the bytes are not `.npy` v1 or v2."""
    if bytes(data[:6]) != NPY_MAGIC or len(data) < 12:
        raise ValueError("not a .npy payload (bad magic string or too short)")
    major, minor = data[6], data[7]
    if (major, minor) == (1, 0):
        return 10 + int.from_bytes(data[8:10], "little")
    if (major, minor) == (2, 0):
        return 12 + int.from_bytes(data[8:12], "little")
    raise ValueError(f".npy format version {(major, minor)} is not supported")


def npy_header_cached(data: bytes | memoryview) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """`npy_header` of `.npy` bytes, parsed once per distinct header.

    The key is the header's exact bytes (magic, version, length and the dict text), so a
    hit is the parse those very bytes gave before: every check of `npy_header` still holds
    for each payload. Numpy's own parser (`ast.literal_eval`) dominated decoding otherwise.
    """
    n = npy_header_len(data)
    if len(data) < n:
        raise ValueError(f".npy header claims {n} bytes but only {len(data)} are present")
    head = bytes(data[:n])
    hit = _NPY_HEADER_CACHE.get(head)
    if hit is None:
        hit = npy_header(head)
        if len(_NPY_HEADER_CACHE) < _NPY_HEADER_CACHE_MAX:
            _NPY_HEADER_CACHE[head] = hit
    return hit


def _decode_npy(data: bytes) -> np.ndarray:
    """`.npy` bytes to an array without pickle, after checking that the header's shape and
    dtype describe exactly the bytes present (a header claiming a huge shape is refused
    before anything is allocated)."""
    shape, fortran, dtype, offset = npy_header_cached(data)
    count = math.prod(shape)
    if count * dtype.itemsize != len(data) - offset:
        raise ValueError(f"header claims shape {shape} of {dtype} ({count * dtype.itemsize} bytes) "
                         f"but {len(data) - offset} bytes of data follow")
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return flat.reshape(shape, order="F" if fortran else "C").copy(order="K")


IMAGE_FORMATS = {"png": ("PNG",), "jpg": ("JPEG",), "jpeg": ("JPEG",)}


def _decode_image(data: bytes, ext: str = "png") -> np.ndarray:
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS  # refuse decompression bombs
    # Only the format the extension names: Pillow would otherwise sniff any of its formats
    # (EPS, for one, runs Ghostscript).
    formats = IMAGE_FORMATS.get(ext.lower().lstrip("."))
    if formats is None:
        raise ValueError(f"'.{ext}' is not an image extension")
    with Image.open(io.BytesIO(data), formats=formats) as im:
        if im.width * im.height > MAX_IMAGE_PIXELS:
            raise ValueError(f"image of {im.width}x{im.height} pixels exceeds the limit")
        im.load()
        arr = np.asarray(im.convert("RGB") if im.mode not in ("L", "RGB") else im)
    return arr if arr.ndim == 3 else arr[:, :, None]


def _decode_wav(data: bytes) -> np.ndarray:
    with wave.open(io.BytesIO(data), "rb") as w:
        width, channels, frames = w.getsampwidth(), w.getnchannels(), w.getnframes()
        if frames * width * channels > MAX_PAYLOAD_BYTES:
            raise ValueError("wav header claims more frames than allowed")
        raw = w.readframes(frames)
    if width == 2:
        x = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif width == 1:
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 4:
        x = np.frombuffer(raw, "<i4").astype(np.float32) / 2147483648.0
    else:
        raise ValueError(f"unsupported sample width {width}")
    return x.reshape(-1, channels).T.copy()  # [channels, time]
