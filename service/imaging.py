"""Turning what people upload into model input and back: images, NIfTI volumes and slice arrays.

Everything here is plain NumPy, Pillow and nibabel, testable without a server. Every function that reads user
input raises :class:`InputError` with a message that says what was wrong and what to do; the service turns it into
a 4xx answer. Limits (bytes, pixels, slices) are checked before the expensive step: an image's size is read from
its header before its pixels are decoded, so a decompression bomb is refused without being decompressed.
"""

from __future__ import annotations

import gzip
import io
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image, UnidentifiedImageError

from mri_platform.data import _resize, _Skip, _to_gray, intensity_window
from mri_platform.noise import NoiseConfig, fixed_noisy

_GZIP_MAGIC = b"\x1f\x8b"
_NIFTI1_MAGIC = (b"n+1\0", b"ni1\0")  # at byte 344 of a NIfTI-1 header
_NIFTI2_MAGIC = (b"n+2\0", b"ni2\0")  # at byte 4 of a NIfTI-2 header


class InputError(ValueError):
    """Bad input from a client: answered with 400 and this message, never a 500."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """What one request may hold. The defaults fit 512x512 scans and whole-brain volumes with room to spare."""

    max_request_bytes: int = 64 * 1024 * 1024
    """Largest request body (an upload or a JSON array); bigger requests get 413."""
    max_image_pixels: int = 4096 * 4096
    """Largest image (width x height) accepted, checked from the header before decoding."""
    max_slices: int = 512
    """Most slices in one /denoise request, and most slices a volume may have along its slice axis."""
    max_volume_voxels: int = 512 * 512 * 512
    """Largest NIfTI volume (voxels of its first 3D volume)."""


# ---------------------------------------------------------------------------------------------------------------
# Slice arrays (the /denoise API)


def as_slice_list(value: object) -> object:
    """JSON ``slices`` as a list of (H, W) float32 arrays: an (N, H, W) nested list is N slices, one (H, W) slice (a
    list of rows of numbers) is a request of one.

    Runs on the parsed JSON, before BentoML turns the slices into arrays, so that anything that is not a rectangular
    array of numbers (an object, a string, null, ragged rows, a 4-D array) is refused here with a message; BentoML's
    own conversion raises TypeError on some of these, which the server answers with 500. The limits and the
    intensity range are checked after it, by :func:`check_slices`.
    """
    if isinstance(value, np.ndarray):  # an in-process call (BentoML's Python client) may pass an array
        array = value
    elif not isinstance(value, list | tuple):
        raise InputError(
            f"expected an (N, H, W) array of numbers (nested lists) or one (H, W) slice, got {_json_kind(value)}"
        )
    elif len(value) == 0:
        return []  # check_slices says that there are no slices
    else:
        try:
            array = np.asarray(value)  # no dtype: a number stays a number, anything else shows in the dtype
        except (ValueError, TypeError, OverflowError):  # numpy says "inhomogeneous shape" for ragged lists
            raise _ragged(value) from None
    if array.dtype == object:  # integers beyond 64 bits, or values that are not numbers
        odd = next((v for v in array.flat if isinstance(v, bool) or not isinstance(v, int | float)), _NUMBERS)
        if odd is not _NUMBERS:
            raise InputError(
                f"could not convert the slices to numbers: they hold {_json_kind(odd)}; send intensities in [0, 1] as "
                "JSON numbers"
            )
        array = array.astype(np.float64)  # huge integers: refused below for their value
    if array.dtype.kind not in "fiu":
        raise InputError(
            f"could not convert the slices to numbers: they hold {_dtype_kind(array.dtype)}; send intensities in "
            "[0, 1] as JSON numbers"
        )
    if array.ndim not in (2, 3):
        raise InputError(
            f"expected slices of shape (N, H, W) or one (H, W) slice, got an array of shape {array.shape}; a slice "
            "is a list of rows of intensities"
        )
    largest = float(np.max(np.abs(array), initial=0.0, where=np.isfinite(array)))
    if largest > _FLOAT32_MAX:  # float32 would make it infinite: refuse it for what it is
        raise InputError(f"intensities must lie in [0, 1], got a value of magnitude {largest:.4g}")
    array = array.astype(np.float32, copy=False)
    return list(array[None] if array.ndim == 2 else array)


def _ragged(value: list | tuple) -> InputError:
    """The error for nested lists that make no array: slices of several sizes, or rows of several lengths."""
    try:
        shapes = {np.asarray(image, dtype=np.float64).shape for image in value}
    except (ValueError, TypeError, OverflowError):
        shapes = set()
    if len(shapes) > 1 and all(len(shape) == 2 for shape in shapes):
        return InputError(
            f"the slices of one request must share one size, got shapes {sorted(shapes)}; send slices of "
            "different sizes in separate requests"
        )
    return InputError(
        "not a rectangular array: every slice must have the same number of rows and every row the same number of "
        "values (an (N, H, W) or (H, W) array)"
    )


_NUMBERS = object()  # "every value is a number", for next()'s default
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _json_kind(value: object) -> str:
    """What a parsed JSON value is, in JSON's words, for a message."""
    kinds = {dict: "an object", str: "a string", bool: "a boolean", type(None): "null", list: "an array"}
    return next((name for kind, name in kinds.items() if isinstance(value, kind)), type(value).__name__)


def _dtype_kind(dtype: np.dtype) -> str:
    return {"b": "booleans", "U": "strings", "S": "strings"}.get(dtype.kind, f"values of dtype {dtype}")


def slices_schema(max_slices: int) -> dict:
    """The JSON Schema of ``slices`` for the OpenAPI spec: an (N, H, W) nested array of intensities, or one (H, W)
    slice. JSON Schema cannot say that the rows are of one length and the slices of one size; the description does.
    ``oneOf``, not ``anyOf``: BentoML 1.4 keeps only the first choice of an anyOf (``_bentoml_sdk/method.py``), and
    the two cannot both match (the items of one slice are numbers, of N slices arrays)."""
    one = {
        "type": "array",
        "minItems": 1,
        "items": {"type": "array", "minItems": 1, "items": {"type": "number", "minimum": 0, "maximum": 1}},
    }
    return {
        "title": "Slices",
        "description": "N slices of one size H x W as an (N, H, W) nested array of intensities in [0, 1] (float32), "
        f"or one (H, W) slice; every row of the same length, N <= {max_slices}, H x W within the pixel limit.",
        "oneOf": [
            {**one, "title": "One slice (H, W)"},
            {"type": "array", "title": "Slices (N, H, W)", "minItems": 1, "maxItems": max_slices, "items": one},
        ],
    }


def slices_output_schema() -> dict:
    """The JSON Schema of /denoise's answer: (N, H, W), the denoised slices in the order sent."""
    row = {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1}}
    return {"type": "array", "title": "Denoised slices (N, H, W)", "items": {"type": "array", "items": row}}


def check_slices(slices: Sequence[np.ndarray] | np.ndarray, max_slices: int, max_pixels: int) -> list[np.ndarray]:
    """(H, W) float32 slices in [0, 1], all of one size, from (N, H, W) or (H, W) input (an array or a list of
    arrays); InputError otherwise. Any H x W of at most ``max_pixels`` is accepted."""
    if isinstance(slices, np.ndarray):
        slices = list(slices[None] if slices.ndim == 2 else slices) if slices.ndim in (2, 3) else [slices]
    if len(slices) == 0:
        raise InputError("the request holds no slices (shape has N = 0)")
    if len(slices) > max_slices:
        raise InputError(
            f"{len(slices)} slices in one request is more than the limit of {max_slices}; split the request"
        )
    shapes = {np.shape(image) for image in slices}
    if len(shapes) > 1:
        raise InputError(
            f"the slices of one request must share one size, got shapes {sorted(shapes)}; send slices of "
            "different sizes in separate requests"
        )
    shape = shapes.pop()
    if len(shape) != 2 or 0 in shape:
        raise InputError(
            f"expected slices of shape (N, H, W) or one (H, W) slice, got slices of shape {shape}; a slice is a "
            "list of rows of intensities"
        )
    if shape[0] * shape[1] > max_pixels:
        raise InputError(
            f"slices of {shape[1]} x {shape[0]} pixels are over the limit of {max_pixels:,} pixels; downscale them "
            "(limit: MRI_SERVICE_MAX_IMAGE_PIXELS)"
        )
    array = np.stack(slices)
    if array.dtype.kind not in "fiu" or array.dtype == np.bool_:
        raise InputError(f"expected numbers (float32 in [0, 1]), got dtype {array.dtype}")
    array = array.astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        bad = int(np.size(array) - np.isfinite(array).sum())
        raise InputError(f"{bad} values are NaN or infinite; send finite intensities in [0, 1]")
    low, high = float(array.min()), float(array.max())
    if low < -1e-3 or high > 1 + 1e-3:
        raise InputError(
            f"intensities must lie in [0, 1] (the model was trained on that range), got [{low:.4g}, {high:.4g}]; "
            "divide 8-bit pixels by 255, or scale a scan by its own range"
        )
    return list(np.clip(array, 0.0, 1.0))


# ---------------------------------------------------------------------------------------------------------------
# Images (the /denoise_image API and the page)


def read_image(content: bytes, limits: Limits) -> np.ndarray:
    """An uploaded PNG/JPEG (any mode, any size within the limits) as gray float32 pixels in [0, 1]."""
    if not content:
        raise InputError("the upload is empty (0 bytes); attach a PNG or JPEG image")
    try:
        image = Image.open(io.BytesIO(content))  # reads the header only
    except Image.DecompressionBombError as exc:  # Pillow refuses twice its own limit when opening
        raise InputError(
            f"the image has more pixels than Pillow opens safely ({exc}), so more than the limit of "
            f"{limits.max_image_pixels:,}; downscale it first",
            status=413,
        ) from None
    except UnidentifiedImageError:
        raise InputError(
            "not an image: the upload is neither PNG nor JPEG nor another format Pillow reads "
            "(for a NIfTI volume use /denoise_volume)"
        ) from None
    except Exception as exc:  # Pillow raises many types on garbage headers
        raise InputError(f"not a readable image, corrupt or truncated ({type(exc).__name__}: {exc})") from None
    with image:
        width, height = image.size
        if width == 0 or height == 0:
            raise InputError(f"the image has zero size ({width} x {height})")
        if width * height > limits.max_image_pixels:
            raise InputError(
                f"the image is {width} x {height} = {width * height:,} pixels, more than the limit of "
                f"{limits.max_image_pixels:,}; downscale it first",
                status=413,
            )
        try:
            image.load()
            return _to_gray(image)  # the training data's conversion, EXIF orientation included
        except Exception as exc:  # truncated or corrupt pixel data behind a valid header
            raise InputError(f"the image is corrupt or truncated ({type(exc).__name__}: {exc})") from None


def resize(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Lanczos resampling clipped to [0, 1], as the training data was resized (nothing to do at the same shape)."""
    return image.astype(np.float32, copy=False) if image.shape == shape else _resize(image, shape)


def encode_png(image: np.ndarray) -> bytes:
    """Gray float pixels in [0, 1] as an 8-bit PNG."""
    pixels = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def check_scorable(image: np.ndarray) -> None:
    """SSIM's 11 x 11 window (``mri_platform.metrics.WINDOW``) needs an image at least that big on both sides."""
    from mri_platform.metrics import WINDOW

    height, width = image.shape
    if min(height, width) < WINDOW:
        raise InputError(
            f"the image is {width} x {height}; scoring it (add_noise) takes at least {WINDOW} x {WINDOW} pixels, "
            "the SSIM window: send a bigger image, or leave add_noise off"
        )


def add_report_noise(clean: np.ndarray, noise: NoiseConfig, seed: int = 0) -> np.ndarray:
    """The noise the model was trained against, drawn from a fixed seed so that a page reload shows the same."""
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(clean, dtype=np.float32))[None, None]
    return fixed_noisy(tensor, noise, seed)[0, 0].clamp(0, 1).numpy()


# ---------------------------------------------------------------------------------------------------------------
# NIfTI volumes (the /denoise_volume API)


@dataclass
class Volume:
    """A NIfTI image's data as float32, with what is needed to write the result back."""

    image: nib.Nifti1Image | nib.Nifti2Image
    data: np.ndarray
    """(X, Y, Z, T) voxel intensities as stored (after scaling); T = 1 for a 3D volume."""
    gzipped: bool


def _declared_size(head: bytes, limits: Limits) -> int:
    """Bytes a NIfTI's header says its file holds (header, extensions and data), from its first bytes; InputError
    (413) if its voxels are over the limit, so that a gzip stream is never decompressed past what is allowed."""
    try:
        if head[4:8] in _NIFTI2_MAGIC:
            header = nib.Nifti2Header(binaryblock=head[:540])
        else:
            header = nib.Nifti1Header(binaryblock=head[:348])
        shape = header.get_data_shape()
        itemsize = header.get_data_dtype().itemsize
        offset = int(header.get_data_offset())
    except Exception:
        return -1  # not a NIfTI header: read_volume says so below
    voxels = int(np.prod(shape)) if shape else 0
    if voxels > limits.max_volume_voxels:
        raise InputError(
            f"the volume has {voxels:,} voxels (shape {tuple(shape)}), more than the limit of "
            f"{limits.max_volume_voxels:,}; send a smaller volume (the limit is in /info)",
            status=413,
        )
    return offset + voxels * itemsize


def read_volume(content: bytes, limits: Limits) -> Volume:
    """An uploaded .nii or .nii.gz (3D, or 4D: every volume) as a :class:`Volume`, or InputError."""
    if not content:
        raise InputError("the upload is empty (0 bytes); attach a .nii or .nii.gz volume")
    gzipped = content[:2] == _GZIP_MAGIC
    raw = content
    if gzipped:
        try:  # bounded: the header is read first, and the data only up to the size it declares within the limits
            with gzip.GzipFile(fileobj=io.BytesIO(content)) as stream:
                raw = stream.read(540)
                declared = _declared_size(raw, limits)
                cap = declared if declared >= 0 else 0
                raw += stream.read(max(0, cap - len(raw)) + 1)
        except (OSError, EOFError) as exc:
            raise InputError(f"the .nii.gz upload is not valid gzip data ({exc})") from None
    else:
        _declared_size(raw[:540], limits)
    if len(raw) < 348:
        raise InputError("not a NIfTI volume: the upload is shorter than a NIfTI header (348 bytes)")
    try:
        kind = nib.Nifti2Image if raw[4:8] in _NIFTI2_MAGIC else nib.Nifti1Image
        image = kind.from_bytes(raw)
    except Exception as exc:  # nibabel raises many types for garbage
        raise InputError(
            f"not a NIfTI volume ({type(exc).__name__}: {exc}); for PNG or JPEG images use /denoise_image"
        ) from None
    shape = image.shape
    if len(shape) < 3 or min(shape) < 1:
        raise InputError(f"expected a 3D or 4D volume, got shape {shape}")
    voxels = int(np.prod(shape))
    if voxels > limits.max_volume_voxels:
        raise InputError(
            f"the volume has {voxels:,} voxels, more than the limit of {limits.max_volume_voxels:,}", status=413
        )
    slices = int(np.prod(shape[2:]))
    if slices > limits.max_slices:
        raise InputError(
            f"the volume has {slices} slices (shape {shape}), more than the limit of {limits.max_slices}",
            status=413,
        )
    try:
        data = np.asarray(image.get_fdata(dtype=np.float32)).reshape(shape[0], shape[1], shape[2], -1)
    except Exception as exc:  # a valid header in front of truncated data
        raise InputError(f"the volume's data is truncated or corrupt ({type(exc).__name__}: {exc})") from None
    if not np.isfinite(data).all():
        raise InputError("the volume holds NaN or infinite voxels; clean them before denoising")
    return Volume(image=image, data=data, gzipped=gzipped)


def looks_like_nifti(content: bytes) -> bool:
    """Gzip data or a NIfTI-1/2 magic: what /preview takes for a volume rather than an image."""
    return content[:2] == _GZIP_MAGIC or content[344:348] in _NIFTI1_MAGIC or content[4:8] in _NIFTI2_MAGIC


def volume_range(data: np.ndarray) -> tuple[float, float]:
    """The intensity window mapped to [0, 1], the same as in training (:func:`mri_platform.data.intensity_window`)."""
    try:
        return intensity_window(data)
    except _Skip as exc:
        raise InputError(f"nothing to denoise in the volume: {exc}") from None


def volume_to_slices(volume: Volume, size: int | None = None) -> tuple[np.ndarray, tuple[float, float]]:
    """Every slice along the third array axis (of every 3D volume of a 4D file), in [0, 1], at its own in-plane
    size, or resized to size x size."""
    low, high = volume_range(volume.data)
    scaled = np.clip((volume.data - low) / (high - low), 0.0, 1.0)
    x, y, z, t = scaled.shape
    stack = scaled.transpose(3, 2, 0, 1).reshape(t * z, x, y)  # (T*Z, X, Y), volume-major
    if size is None:
        return np.ascontiguousarray(stack, dtype=np.float32), (low, high)
    return np.stack([resize(s, (size, size)) for s in stack]), (low, high)


def slices_to_volume(volume: Volume, denoised: np.ndarray, window: tuple[float, float]) -> bytes:
    """Write denoised (T*Z, H, W) slices back at the volume's own size (resized if need be), intensity window and
    geometry.

    The affine, the voxel sizes and the rest of the header are the input's; the data are stored as float32 (the
    denoiser's output is continuous, so the input's integer type would round it).
    """
    low, high = window
    x, y, z, t = volume.data.shape
    stack = np.stack([resize(s, (x, y)) for s in denoised]).reshape(t, z, x, y).transpose(2, 3, 1, 0)
    out = (stack * (high - low) + low).reshape(volume.image.shape).astype(np.float32)
    header = volume.image.header.copy()
    header.set_data_dtype(np.float32)
    result = type(volume.image)(out, volume.image.affine, header)
    result.header.set_slope_inter(1.0, 0.0)
    suffix = ".nii.gz" if volume.gzipped else ".nii"
    with tempfile.TemporaryDirectory() as folder:  # nibabel writes .nii.gz through a path
        path = Path(folder) / f"denoised{suffix}"
        nib.save(result, path)
        return path.read_bytes()
