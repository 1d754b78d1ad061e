"""Training data sources, robust image decoding and captions.

``iter_samples`` turns whatever ``--dataset`` names into ``RawSample``s (an origin, the raw
caption, a lazy reader of the encoded image file); ``load_image`` decodes those bytes into an
RGB image or raises ``SkipSample``; ``build_caption`` makes the training caption (or raises
``SkipSample``); ``sample_id``/``caption_id`` give content ids for the embedding cache.

A sample that cannot be used is skipped with a reason rather than failing the run: a missing or
unreadable image file, undecodable bytes, too small or too large an image, no caption. Errors
in the dataset as a whole (no such path, a missing column) raise at once.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jfif", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif"}
)
TABLE_SUFFIXES = (".parquet", ".csv", ".jsonl", ".json")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
# Tried in order when --caption_column / --image_column are not given.
CAPTION_COLUMNS = ("text", "caption", "action")
IMAGE_COLUMNS = ("image", "file_name", "image_path", "path")
# Marks of a folder written by datasets' save_to_disk (a Dataset, or a DatasetDict).
SAVED_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")
# PIL's own hard limit (2 * Image.MAX_IMAGE_PIXELS, ~179 megapixels): the same default, and a
# larger max_pixels still stops there unless Image.MAX_IMAGE_PIXELS is raised too.
DEFAULT_MAX_PIXELS = 178_956_970
DEFAULT_MIN_SIDE = 64

# Only raster formats that decode in-process: Pillow would otherwise also try formats such as
# EPS, which runs Ghostscript on the file, and untrusted training data should not reach that.
Image.init()
DECODE_FORMATS = tuple(
    name for name in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF") if name in Image.OPEN
)
# Pillow's decoders signal malformed input with any of these.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)
_SIXTEEN_BIT_GRAY = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


class SkipSample(Exception):
    """A sample that is left out, with the reason (e.g. "too small: 40x300 px ...").

    Attributes:
        reason: why, starting with the kind of problem ("corrupt or truncated image: ...").
        source: the sample's origin (``RawSample.source``), or "".
    """

    def __init__(self, reason: str, source: str = "") -> None:
        super().__init__(f"{source}: {reason}" if source else reason)
        self.reason = reason
        self.source = source

    def __reduce__(self):  # keep both fields when sent between worker processes
        return (SkipSample, (self.reason, self.source))


@dataclass(frozen=True)
class RawSample:
    """One training example as found in the source, before decoding.

    Attributes:
        source: human-readable origin, e.g. "demo/images/cat.jpg" or "table.parquet row 3"
            (rows count from 0, header excluded).
        caption: the raw caption (None when there is none: no .txt file, null cell, no key).
        read_bytes: reads the encoded image file; raises ``SkipSample`` when the image is
            missing or unreadable (a file that does not exist, an empty cell, a URL).
    """

    source: str
    caption: str | None
    read_bytes: Callable[[], bytes]


def iter_samples(
    source: str,
    *,
    image_column: str | None = None,
    caption_column: str | None = None,
    split: str = "train",
) -> Iterator[RawSample]:
    """The samples of ``--dataset source``, in a deterministic order.

    ``source`` may be:

    * a folder of images (extensions in ``IMAGE_EXTENSIONS``, any case, searched recursively,
      skipping hidden files and folders such as ``.oxen``), each captioned by the ``.txt`` file
      with the same stem beside it; or, when the folder holds ``metadata.jsonl`` or
      ``metadata.csv`` (the Hugging Face imagefolder convention: a ``file_name`` column plus a
      caption column), the rows of that file, which then wins over any ``.txt`` files;
    * a table file (``.parquet``, ``.csv``, ``.jsonl``, ``.json`` holding an array of objects or
      JSON lines) with an image column holding a path (relative paths are resolved against the
      table's folder), raw bytes, or a datasets ``Image`` struct ``{bytes, path}``;
    * a folder written by ``datasets``' ``save_to_disk`` (a Dataset, or a DatasetDict from which
      ``split`` is taken);
    * otherwise, a Hugging Face Hub dataset name ("owner/name"), loaded with
      ``datasets.load_dataset(source, split=split)`` (needs the Hub or its local cache).

    Columns: ``caption_column`` defaults to the first of ``CAPTION_COLUMNS`` present and
    ``image_column`` to the first of ``IMAGE_COLUMNS`` present.

    The source and its columns are checked when this is called; the returned iterator then
    reads tables and caption files as it goes (JSON tables are read whole).

    Raises:
        FileNotFoundError: ``source`` is neither an existing path nor an available Hub dataset.
        ValueError: a missing column (naming ``--caption_column``/``--image_column`` and listing
            the columns present), an unsupported file type, a folder with no images, a missing
            split, or column flags given for a folder of images with ``.txt`` captions.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if any((path / name).is_file() for name in SAVED_DATASET_FILES):
            dataset = _load_saved_dataset(path, source, split)
            return _dataset_samples(dataset, source, path, image_column, caption_column)
        return _folder_samples(path, source, image_column, caption_column)
    if path.is_file():
        if path.suffix.lower() not in TABLE_SUFFIXES:
            raise ValueError(
                f"--dataset {source}: unsupported file type {path.suffix!r}; expected a folder of "
                f"images, a table ({', '.join(TABLE_SUFFIXES)}), or a folder written by "
                "datasets' save_to_disk"
            )
        return _table_samples(path, source, image_column, caption_column)
    # "owner/name" could be a local path that is missing or a Hub dataset: ask the Hub. Anything
    # else (absolute, ./relative, deeper paths, file names with a table suffix) is a local path.
    if not _HUB_ID.match(source) or source.lower().endswith(TABLE_SUFFIXES):
        raise FileNotFoundError(f"--dataset {source}: no such file or folder")
    import datasets  # imported here: it is slow to import and only this branch and the next need it

    try:
        dataset = datasets.load_dataset(source, split=split)
    except (ConnectionError, FileNotFoundError) as error:
        raise FileNotFoundError(
            f"--dataset {source}: no such local file or folder, and the Hugging Face Hub could "
            f"not provide a dataset of that name ({error})"
        ) from error
    return _dataset_samples(dataset, source, Path.cwd(), image_column, caption_column)


def load_image(
    data: bytes,
    source: str,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
) -> Image.Image:
    """Decode an encoded image file into an upright 8-bit RGB image.

    * Size limits are checked from the header, before any pixel is decoded: more than
      ``max_pixels`` (a decompression bomb, or just too big) or a short side under ``min_side``
      pixels is skipped.
    * EXIF orientation is applied (``ImageOps.exif_transpose``), so the size returned may be
      the header's transposed.
    * Transparency (RGBA, LA, palette or colour-key transparency) is composited over white, not
      black: a cut-out subject on transparent background is conventionally shown and generated
      on white, and dropping the alpha channel would expose whatever colour the transparent
      pixels happen to hold (often black).
    * 16-bit grayscale (``I;16``; ``I`` is read as 16-bit data, clipped to 0..65535) is scaled
      to 8 bits with rounding (65535 -> 255, 32768 -> 128), not clipped.
    * CMYK, palette, 1-bit, L and other modes use Pillow's conversion to RGB.
    * Animated images give their first frame.

    Raises:
        SkipSample: undecodable or non-image bytes, a corrupt or truncated file, a format not in
            ``DECODE_FORMATS``, a 32-bit float image, too many pixels, too small.
    """
    try:
        image = Image.open(io.BytesIO(data), formats=DECODE_FORMATS)
    except Image.DecompressionBombError as error:
        raise SkipSample(f"too large (decompression bomb guard): {error}", source) from None
    except Image.UnidentifiedImageError:
        raise SkipSample(
            f"not an image, or not one of the formats {', '.join(DECODE_FORMATS)}", source
        ) from None
    except _DECODE_ERRORS as error:
        raise SkipSample(f"corrupt or truncated image: {error}", source) from None
    width, height = image.size
    if width * height > max_pixels:
        raise SkipSample(
            f"too large: {width}x{height} = {width * height} pixels is over max_pixels "
            f"{max_pixels} (decompression bomb guard; not decoded)",
            source,
        )
    if min(width, height) < min_side:
        raise SkipSample(f"too small: {width}x{height} px, short side under {min_side}", source)
    try:
        image.load()  # decodes the first frame only
        image = ImageOps.exif_transpose(image)
    except _DECODE_ERRORS as error:
        raise SkipSample(f"corrupt or truncated image: {error}", source) from None
    return _to_rgb(image, source)


def build_caption(
    raw: str | None,
    source: str,
    *,
    trigger_phrase: str = "",
    prefix: str = "",
    suffix: str = "",
) -> str:
    """The training caption: ``prefix + raw + suffix``, trigger phrase first.

    Whitespace is normalised: the caption is stripped and every run of whitespace (newlines
    included) becomes one space. ``prefix`` and ``suffix`` are joined literally, so include any
    separator (``prefix="a photo of "``). A non-empty ``trigger_phrase`` is prepended as
    ``"TRIGGER, caption"`` unless the caption already contains it as a whole word
    (case-sensitive), so captions written around the trigger are not given it twice.

    Raises:
        SkipSample: ``raw`` is None ("missing caption") or only whitespace ("empty caption").
    """
    if raw is None:
        raise SkipSample("missing caption (no .txt file or no value in the caption column)", source)
    if not raw.strip():
        raise SkipSample("empty caption", source)
    caption = " ".join(f"{prefix}{raw.strip()}{suffix}".split())
    trigger = " ".join(trigger_phrase.split())
    if trigger and not re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", caption):
        caption = f"{trigger}, {caption}"
    return caption


def sample_id(image_bytes: bytes, caption: str) -> str:
    """Content id of an (encoded image file, final caption) pair: 20 hex chars of sha256.

    Hashes the image's own sha256 digest (fixed 32 bytes) followed by the UTF-8 caption, so no
    shift of bytes between image and caption gives the same id.
    """
    digest = hashlib.sha256(hashlib.sha256(image_bytes).digest())
    digest.update(caption.encode("utf-8"))
    return digest.hexdigest()[:20]


def caption_id(caption: str) -> str:
    """Content id of a caption: the first 20 hex chars of sha256 of its UTF-8 bytes."""
    return hashlib.sha256(caption.encode("utf-8")).hexdigest()[:20]


def _to_rgb(image: Image.Image, source: str) -> Image.Image:
    if image.mode in _SIXTEEN_BIT_GRAY:
        values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        gray = ((values * 255 + 32767) // 65535).astype(np.uint8)  # round(v / 257)
        return Image.fromarray(gray).convert("RGB")
    if image.mode == "F":
        # Float images have no agreed range (0..1, 0..255, HDR): any scaling would be a guess.
        raise SkipSample("unsupported pixel format: 32-bit float (mode F)", source)
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _raise_skip(reason: str, source: str) -> bytes:
    raise SkipSample(reason, source)


def _read_file(path: Path, source: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise SkipSample(f"image file not found: {path}", source) from None
    except OSError as error:
        raise SkipSample(f"cannot read image file {path}: {error}", source) from None


def _image_reader(value: Any, base: Path, column: str, source: str) -> Callable[[], bytes]:
    """A reader for one image-column value: path (relative to ``base``), bytes, {bytes, path}."""
    if isinstance(value, dict):  # a datasets Image struct; embedded bytes win over the path
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)) and value:
        return partial(bytes, value)
    if isinstance(value, str) and value.strip():
        if value.startswith(("http://", "https://")):
            return partial(
                _raise_skip,
                f"image column {column!r} holds a URL ({value}), which is not downloaded; "
                "download the images and give local paths",
                source,
            )
        return partial(_read_file, base / Path(value).expanduser(), source)
    if value is None or isinstance(value, (str, bytes, bytearray)):  # null, empty or blank
        return partial(_raise_skip, f"no image in column {column!r}", source)
    return partial(
        _raise_skip,
        f"unsupported value of type {type(value).__name__} in column {column!r}",
        source,
    )


def _caption_value(value: Any) -> str | None:
    return value if value is None or isinstance(value, str) else str(value)


def _pick_column(
    columns: list[str], requested: str | None, candidates: tuple[str, ...], flag: str, where: str
) -> str:
    present = ", ".join(columns) or "(none)"
    if requested is not None:
        if requested in columns:
            return requested
        raise ValueError(
            f"{flag} {requested!r} is not a column of {where}; columns present: {present}"
        )
    for name in candidates:
        if name in columns:
            return name
    raise ValueError(
        f"{where} has none of the columns {', '.join(candidates)}; name the column with {flag}. "
        f"Columns present: {present}"
    )


def _folder_samples(
    root: Path, source: str, image_column: str | None, caption_column: str | None
) -> Iterator[RawSample]:
    metadata = [root / name for name in METADATA_FILES if (root / name).is_file()]
    if len(metadata) > 1:
        raise ValueError(
            f"--dataset {source}: both metadata.jsonl and metadata.csv are present; keep one"
        )
    if metadata:
        return _table_samples(metadata[0], str(metadata[0]), image_column, caption_column)
    if image_column is not None or caption_column is not None:
        raise ValueError(
            f"--dataset {source} is a folder of images captioned by .txt files: --image_column "
            "and --caption_column only apply to tables and metadata.jsonl/metadata.csv; drop them"
        )
    images = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        images.extend(
            Path(folder, name)
            for name in files
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS
        )
    if not images:
        raise ValueError(
            f"--dataset {source}: no images found (looked for files ending "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))}, and for metadata.jsonl/metadata.csv)"
        )
    images.sort(key=lambda path: path.relative_to(root).as_posix())
    return (
        RawSample(
            str(path),
            _read_caption_file(path.with_suffix(".txt")),
            partial(_read_file, path, str(path)),
        )
        for path in images
    )


def _read_caption_file(path: Path) -> str | None:
    if not path.is_file():
        return None
    # utf-8-sig drops a byte-order mark; invalid bytes become U+FFFD rather than stopping the run.
    return path.read_text(encoding="utf-8-sig", errors="replace")


def _table_samples(
    table: Path, source: str, image_column: str | None, caption_column: str | None
) -> Iterator[RawSample]:
    columns, read_rows = _open_table(table)
    image_col = _pick_column(columns, image_column, IMAGE_COLUMNS, "--image_column", str(table))
    caption_col = _pick_column(
        columns, caption_column, CAPTION_COLUMNS, "--caption_column", str(table)
    )
    base = table.parent

    def generate() -> Iterator[RawSample]:
        for index, row in enumerate(read_rows([image_col, caption_col])):
            origin = f"{source} row {index}"
            yield RawSample(
                origin,
                _caption_value(row.get(caption_col)),
                _image_reader(row.get(image_col), base, image_col, origin),
            )

    return generate()


def _open_table(table: Path) -> tuple[list[str], Callable[[list[str]], Iterator[dict]]]:
    """The columns of a table file and a function that streams its rows as dicts."""
    suffix = table.suffix.lower()
    if suffix == ".parquet":
        try:
            parquet = pq.ParquetFile(table)
        except (pa.ArrowException, OSError) as error:
            raise ValueError(f"--dataset {table}: not a readable parquet file ({error})") from error

        def parquet_rows(wanted: list[str]) -> Iterator[dict]:
            for batch in parquet.iter_batches(batch_size=256, columns=list(dict.fromkeys(wanted))):
                yield from batch.to_pylist()

        return parquet.schema_arrow.names, parquet_rows
    if suffix == ".csv":
        with table.open(newline="", encoding="utf-8-sig") as handle:
            header = next(csv.reader(handle), [])

        def csv_rows(_wanted: list[str]) -> Iterator[dict]:
            with table.open(newline="", encoding="utf-8-sig") as handle:
                yield from csv.DictReader(handle)

        return header, csv_rows
    rows = _read_json_rows(table)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return columns, lambda _wanted: iter(rows)


def _read_json_rows(table: Path) -> list[dict]:
    """Rows of a JSON array of objects, or of JSON lines (one object a line)."""
    text = table.read_text(encoding="utf-8-sig")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"--dataset {table}: invalid JSON: {error}") from error
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"--dataset {table} line {number}: invalid JSON: {error}"
                ) from error
    if not all(isinstance(row, dict) for row in rows):
        raise ValueError(
            f"--dataset {table}: expected JSON objects (one per image, e.g. "
            '{"file_name": "a.png", "text": "..."}), as a JSON array or as JSON lines'
        )
    return rows


def _load_saved_dataset(path: Path, source: str, split: str):
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(
                f"--dataset {source}: no split {split!r}; splits present: {', '.join(loaded)}"
            )
        return loaded[split]
    return loaded


def _dataset_samples(
    dataset, source: str, base: Path, image_column: str | None, caption_column: str | None
) -> Iterator[RawSample]:
    """Samples of a ``datasets.Dataset``; relative image paths resolve against ``base``."""
    import datasets

    columns = list(dataset.column_names)
    image_col = _pick_column(columns, image_column, IMAGE_COLUMNS, "--image_column", source)
    caption_col = _pick_column(columns, caption_column, CAPTION_COLUMNS, "--caption_column", source)
    dataset = dataset.select_columns(list(dict.fromkeys([image_col, caption_col])))
    if isinstance(dataset.features[image_col], datasets.Image):
        # Raw {bytes, path} instead of PIL images, so load_image does all the decoding and its
        # checks (size limits before decoding, transparency, EXIF) apply to every source alike.
        dataset = dataset.cast_column(image_col, datasets.Image(decode=False))

    def generate() -> Iterator[RawSample]:
        for index, row in enumerate(dataset):
            origin = f"{source} row {index}"
            yield RawSample(
                origin,
                _caption_value(row[caption_col]),
                _image_reader(row[image_col], base, image_col, origin),
            )

    return generate()
