import csv
import hashlib
import io
import json
import pickle
import struct
import time
import zlib
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fluxlora import data
from fluxlora.data import (
    RawSample,
    SkipSample,
    build_caption,
    caption_id,
    iter_samples,
    load_image,
    sample_id,
)

# ---------------------------------------------------------------- helpers


def encode(image: Image.Image, fmt: str = "PNG", **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_args)
    return buffer.getvalue()


def noise(width: int = 96, height: int = 80, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
    )


def png_header_only(width: int, height: int, idat: bytes) -> bytes:
    """A PNG whose header claims width x height RGB pixels, followed by the given IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def skip_reason(payload: bytes, **kwargs) -> str:
    with pytest.raises(SkipSample) as info:
        load_image(payload, "sample.bin", **kwargs)
    assert info.value.source == "sample.bin"
    return info.value.reason


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(int)


# ---------------------------------------------------------------- load_image: good input


def test_rgb_round_trip():
    image = noise()
    out = load_image(encode(image), "x")
    assert out.mode == "RGB" and out.size == (96, 80)
    assert np.array_equal(np.asarray(out), np.asarray(image))


def test_cmyk_converted_like_pillow():
    red = Image.new("CMYK", (64, 64), (0, 255, 255, 0))
    out = load_image(encode(red, "TIFF"), "x")
    assert out.mode == "RGB" and out.getpixel((3, 3)) == (255, 0, 0)
    cmyk = noise().convert("CMYK")
    payload = encode(cmyk, "JPEG", quality=95)
    expected = Image.open(io.BytesIO(payload)).convert("RGB")
    assert np.array_equal(np.asarray(load_image(payload, "x")), np.asarray(expected))


def test_rgba_composited_over_white():
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[:, :16] = (255, 0, 0, 0)  # fully transparent red
    rgba[:, 16:32] = (0, 0, 0, 128)  # half transparent black
    rgba[:, 32:] = (0, 0, 255, 255)  # opaque blue
    out = load_image(encode(Image.fromarray(rgba)), "x")
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert all(abs(v - 127) <= 1 for v in out.getpixel((20, 0)))
    assert out.getpixel((40, 0)) == (0, 0, 255)


def test_la_composited_over_white():
    la = Image.merge("LA", [Image.new("L", (64, 64), 0), Image.new("L", (64, 64), 0)])
    assert load_image(encode(la), "x").getpixel((5, 5)) == (255, 255, 255)


def test_palette_with_transparency_over_white():
    palette_image = Image.new("P", (64, 64), 1)
    palette_image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette_image.paste(0, (0, 0, 32, 64))
    payload = encode(palette_image, transparency=0)  # index 0 (black) is transparent
    out = load_image(payload, "x")
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((40, 0)) == (255, 0, 0)


def test_palette_without_transparency():
    palette_image = Image.new("P", (64, 64), 2)
    palette_image.putpalette([0, 0, 0, 255, 0, 0, 0, 200, 50] + [0] * 759)
    out = load_image(encode(palette_image), "x")
    assert out.mode == "RGB" and out.getpixel((9, 9)) == (0, 200, 50)


def test_sixteen_bit_gray_scaled_not_clipped():
    values = np.full((64, 64), 1000, np.uint16)
    values[0, :4] = [0, 257, 32768, 65535]
    image = Image.fromarray(values)
    payload = encode(image)
    assert Image.open(io.BytesIO(payload)).mode == "I;16"
    out = pixels(load_image(payload, "x"))
    assert out[0, :4, 0].tolist() == [0, 1, 128, 255]
    assert (out[0, :4, 0] == out[0, :4, 2]).all()  # gray in all three channels
    assert out[5, 5, 0] == 4  # 1000 / 257 = 3.9, not 255 (clipped) or 1000 & 255


def test_32_bit_integer_gray_read_as_sixteen_bit():
    values = np.full((64, 64), 65535, np.int32)
    values[0, :3] = [-5, 32768, 70000]
    payload = encode(Image.fromarray(values), "TIFF")
    assert Image.open(io.BytesIO(payload)).mode == "I"
    assert pixels(load_image(payload, "x"))[0, :4, 0].tolist() == [0, 128, 255, 255]


def test_float_image_skipped():
    payload = encode(Image.fromarray(np.full((64, 64), 0.5, np.float32)), "TIFF")
    assert "mode F" in skip_reason(payload)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation_applied(fmt):
    image = Image.new("RGB", (20, 10), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 4, 4))  # red top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: shown rotated 90 degrees clockwise
    out = load_image(encode(image, fmt, exif=exif.tobytes()), "x", min_side=1)
    assert out.size == (10, 20)
    # Rotating clockwise carries the top-left corner to the top-right.
    assert pixels(out)[1, 8].tolist() == pytest.approx([255, 0, 0], abs=40)
    assert pixels(out)[1, 1].tolist() == pytest.approx([0, 0, 255], abs=40)


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (64, 64), color) for color in [(255, 0, 0), (0, 255, 0)]]
    payload = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    assert Image.open(io.BytesIO(payload)).n_frames == 2
    out = load_image(payload, "x")
    assert out.mode == "RGB" and out.getpixel((10, 10)) == (255, 0, 0)


# ---------------------------------------------------------------- load_image: bad input


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file(fmt):
    payload = encode(noise(128, 128), fmt)
    assert skip_reason(payload[: len(payload) // 2]).startswith("corrupt or truncated image")


def test_corrupted_png_data():
    payload = bytearray(encode(noise(128, 128)))
    payload[200:260] = bytes(60)  # inside the IDAT: breaks its CRC and the zlib stream
    assert skip_reason(bytes(payload)).startswith("corrupt or truncated image")


def test_text_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("these are my notes, not a picture\n")
    assert skip_reason(path.read_bytes()).startswith("not an image")


def test_empty_bytes():
    assert skip_reason(b"").startswith("not an image")


def test_eps_is_refused_without_running_ghostscript():
    payload = encode(Image.new("RGB", (64, 64)), "EPS")
    assert Image.open(io.BytesIO(payload)).format == "EPS"  # Pillow alone would accept it
    assert skip_reason(payload).startswith("not an image")


def test_too_small():
    assert skip_reason(encode(Image.new("RGB", (300, 40)))).startswith("too small")
    assert load_image(encode(Image.new("RGB", (300, 40))), "x", min_side=40).size == (300, 40)


def test_decompression_bomb_from_header_alone():
    # 60000 x 60000 claimed with a few bytes of data: refused from the header by Pillow's guard.
    started = time.perf_counter()
    assert skip_reason(png_header_only(60_000, 60_000, zlib.compress(b"\0" * 100))).startswith(
        "too large"
    )
    assert time.perf_counter() - started < 1.0


def test_max_pixels_checked_before_decoding():
    # The IDAT is garbage: had the pixels been decoded, the reason would be "corrupt".
    bogus = png_header_only(100, 100, b"definitely not zlib data")
    assert skip_reason(bogus, max_pixels=5_000).startswith("too large")
    assert skip_reason(bogus).startswith("corrupt or truncated image")
    assert skip_reason(encode(noise(100, 100)), max_pixels=9_999).startswith("too large")
    assert load_image(encode(noise(100, 100)), "x", max_pixels=10_000).size == (100, 100)


def test_skip_sample_message_and_pickling():
    error = SkipSample("too small: 3x3 px", "a/b.png")
    assert str(error) == "a/b.png: too small: 3x3 px"
    clone = pickle.loads(pickle.dumps(error))
    assert (clone.reason, clone.source) == (error.reason, error.source)


# ---------------------------------------------------------------- captions and ids


def test_build_caption():
    assert build_caption("  a dog\non grass \n", "x") == "a dog on grass"
    assert build_caption("a dog", "x", trigger_phrase="ohwx") == "ohwx, a dog"
    assert build_caption("a dog", "x", trigger_phrase=" ohwx  man ") == "ohwx man, a dog"
    # Already there as a word: not repeated; inside another word does not count.
    assert build_caption("photo of ohwx dog", "x", trigger_phrase="ohwx") == "photo of ohwx dog"
    assert build_caption("ohwxyz dog", "x", trigger_phrase="ohwx") == "ohwx, ohwxyz dog"
    assert (
        build_caption("a dog", "x", trigger_phrase="TOK", prefix="a photo of ", suffix=", 4k")
        == "TOK, a photo of a dog, 4k"
    )


@pytest.mark.parametrize(
    "raw,reason", [(None, "missing caption"), ("", "empty"), (" \n\t", "empty")]
)
def test_build_caption_skips(raw, reason):
    with pytest.raises(SkipSample, match=reason) as info:
        build_caption(raw, "img.png", trigger_phrase="ohwx", prefix="p ")
    assert info.value.source == "img.png"


def test_ids():
    assert len(sample_id(b"abc", "cap")) == 20 and len(caption_id("cap")) == 20
    int(sample_id(b"abc", "cap"), 16)
    assert sample_id(b"abc", "cap") == sample_id(b"abc", "cap")
    assert sample_id(b"abc", "cap") != sample_id(b"abd", "cap")
    assert sample_id(b"abc", "cap") != sample_id(b"abc", "cap.")
    assert sample_id(b"ab", "ccap") != sample_id(b"abc", "cap")  # no concatenation collisions
    assert caption_id("a dog") == hashlib.sha256(b"a dog").hexdigest()[:20]
    assert caption_id("a dog") != caption_id("a dog ")


# ---------------------------------------------------------------- sources


def collect(samples) -> list[tuple[str, str | None, bytes]]:
    return [(s.source, s.caption, s.read_bytes()) for s in samples]


@pytest.fixture
def images(tmp_path) -> dict[str, bytes]:
    """Three distinct small PNGs saved under tmp_path/img/."""
    folder = tmp_path / "img"
    folder.mkdir()
    payloads = {}
    for index, name in enumerate(["a.png", "b.png", "c.png"]):
        payloads[name] = encode(noise(64, 64, seed=index))
        (folder / name).write_bytes(payloads[name])
    return payloads


def test_folder_with_txt_captions(tmp_path):
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    (root / ".oxen" / "versions").mkdir(parents=True)
    files = {
        "b.png": encode(noise(seed=1)),
        "A.JPG": encode(noise(seed=2), "JPEG"),
        "sub/c.webp": encode(noise(seed=3), "WEBP"),
        "nocap.png": encode(noise(seed=4)),
        ".oxen/versions/old.png": encode(noise(seed=5)),
        ".hidden.png": encode(noise(seed=6)),
    }
    for name, payload in files.items():
        (root / name).write_bytes(payload)
    (root / "b.txt").write_text("\ufeffa cat\n", encoding="utf-8")
    (root / "A.txt").write_text("upper case", encoding="utf-8")
    (root / "sub" / "c.txt").write_text("nested", encoding="utf-8")
    (root / "readme.md").write_text("not an image")
    samples = list(iter_samples(str(root)))
    assert all(isinstance(sample, RawSample) for sample in samples)
    assert [s.source for s in samples] == [
        str(root / "A.JPG"),
        str(root / "b.png"),
        str(root / "nocap.png"),
        str(root / "sub" / "c.webp"),
    ]
    assert [s.caption for s in samples] == ["upper case", "a cat\n", None, "nested"]
    assert samples[3].read_bytes() == files["sub/c.webp"]
    # Iterating twice gives the same order (deterministic).
    assert [s.source for s in iter_samples(str(root))] == [s.source for s in samples]


def test_folder_missing_file_is_a_skip(tmp_path):
    (tmp_path / "a.png").write_bytes(encode(noise()))
    [sample] = list(iter_samples(str(tmp_path)))
    (tmp_path / "a.png").unlink()
    with pytest.raises(SkipSample, match="not found"):
        sample.read_bytes()


def test_folder_errors(tmp_path):
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(ValueError, match="no images found"):
        iter_samples(str(tmp_path))
    (tmp_path / "a.png").write_bytes(encode(noise()))
    with pytest.raises(ValueError, match="--caption_column"):
        iter_samples(str(tmp_path), caption_column="text")


def test_folder_with_metadata_jsonl_wins_over_txt(tmp_path, images):
    folder = tmp_path / "img"
    (folder / "a.txt").write_text("from txt")
    rows = [{"file_name": "b.png", "text": "bee"}, {"file_name": "a.png", "text": "ay"}]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    got = collect(iter_samples(str(folder)))
    metadata = folder / "metadata.jsonl"
    assert got == [
        (f"{metadata} row 0", "bee", images["b.png"]),
        (f"{metadata} row 1", "ay", images["a.png"]),
    ]


def test_folder_with_metadata_csv_and_caption_column(tmp_path, images):
    folder = tmp_path / "img"
    with (folder / "metadata.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file_name", "text", "long_caption"])
        writer.writerow(["c.png", "short", "a long caption"])
        writer.writerow(["a.png", "", ""])
    got = collect(iter_samples(str(folder), caption_column="long_caption"))
    assert [(caption, payload) for _, caption, payload in got] == [
        ("a long caption", images["c.png"]),
        ("", images["a.png"]),
    ]


def test_folder_with_two_metadata_files(tmp_path, images):
    (tmp_path / "img" / "metadata.csv").write_text("file_name,text\n")
    (tmp_path / "img" / "metadata.jsonl").write_text("")
    with pytest.raises(ValueError, match="keep one"):
        iter_samples(str(tmp_path / "img"))


def test_parquet_with_relative_and_absolute_paths(tmp_path, images):
    table = pa.table(
        {
            "file_name": ["img/a.png", str(tmp_path / "img" / "b.png"), "img/missing.png"],
            "caption": ["one", "two", "three"],
        }
    )
    pq.write_table(table, tmp_path / "data.parquet")
    samples = list(iter_samples(str(tmp_path / "data.parquet")))
    assert [s.caption for s in samples] == ["one", "two", "three"]
    assert samples[0].source == f"{tmp_path / 'data.parquet'} row 0"
    assert samples[0].read_bytes() == images["a.png"]
    assert samples[1].read_bytes() == images["b.png"]
    with pytest.raises(SkipSample, match="not found"):
        samples[2].read_bytes()


def test_parquet_with_bytes_and_nulls(tmp_path, images):
    table = pa.table(
        {
            "image": pa.array([images["a.png"], None, images["c.png"]], pa.binary()),
            "text": ["one", "two", None],
        }
    )
    pq.write_table(table, tmp_path / "bytes.parquet")
    samples = list(iter_samples(str(tmp_path / "bytes.parquet")))
    assert samples[0].read_bytes() == images["a.png"]
    with pytest.raises(SkipSample, match="no image"):
        samples[1].read_bytes()
    assert samples[2].caption is None and samples[2].read_bytes() == images["c.png"]


def test_parquet_with_datasets_image_struct(tmp_path, images):
    # As datasets writes an Image column with embedded bytes (e.g. a Hub parquet shard).
    structs = [{"bytes": images[name], "path": name} for name in ("a.png", "b.png")]
    dataset = datasets.Dataset.from_dict({"image": structs, "text": ["x", "y"]}).cast_column(
        "image", datasets.Image()
    )
    dataset.to_parquet(str(tmp_path / "hf.parquet"))
    assert pq.read_schema(tmp_path / "hf.parquet").field("image").type == pa.struct(
        [("bytes", pa.binary()), ("path", pa.string())]
    )
    (tmp_path / "img" / "a.png").unlink()  # the bytes are embedded: no file is needed
    got = collect(iter_samples(str(tmp_path / "hf.parquet")))
    assert [(caption, payload) for _, caption, payload in got] == [
        ("x", images["a.png"]),
        ("y", images["b.png"]),
    ]


def test_struct_without_bytes_uses_path_and_urls_are_skipped(tmp_path, images):
    struct_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "image": pa.array(
                [{"bytes": None, "path": "img/c.png"}, {"bytes": None, "path": None}], struct_type
            ),
            "url_col": ["https://example.com/x.jpg", "img/a.png"],
            "text": ["x", "y"],
        }
    )
    pq.write_table(table, tmp_path / "s.parquet")
    samples = list(iter_samples(str(tmp_path / "s.parquet")))
    assert samples[0].read_bytes() == images["c.png"]
    with pytest.raises(SkipSample, match="no image"):
        samples[1].read_bytes()
    by_url = list(iter_samples(str(tmp_path / "s.parquet"), image_column="url_col"))
    with pytest.raises(SkipSample, match="URL"):
        by_url[0].read_bytes()
    assert by_url[1].read_bytes() == images["a.png"]


def test_csv_table(tmp_path, images):
    with (tmp_path / "t.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_path", "action", "other"])
        writer.writerow(["img/b.png", "jump, then run", "1"])
        writer.writerow(["img/a.png", "sit", "2"])
    got = collect(iter_samples(str(tmp_path / "t.csv")))
    assert [(source, caption) for source, caption, _ in got] == [
        (f"{tmp_path / 't.csv'} row 0", "jump, then run"),
        (f"{tmp_path / 't.csv'} row 1", "sit"),
    ]
    assert got[0][2] == images["b.png"]


def test_jsonl_and_json_tables(tmp_path, images):
    rows = [{"path": "img/a.png", "text": "ay", "extra": 1}, {"path": "img/b.png"}]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n\n")
    (tmp_path / "t.json").write_text(json.dumps(rows))
    for name in ("t.jsonl", "t.json"):
        got = collect(iter_samples(str(tmp_path / name)))
        assert [(caption, payload) for _, caption, payload in got] == [
            ("ay", images["a.png"]),
            (None, images["b.png"]),
        ]


def test_bad_json(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png"}\n{oops\n')
    with pytest.raises(ValueError, match="line 2"):
        iter_samples(str(tmp_path / "bad.jsonl"))
    (tmp_path / "list.json").write_text('[["a.png", "cap"]]')
    with pytest.raises(ValueError, match="JSON objects"):
        iter_samples(str(tmp_path / "list.json"))


def test_missing_columns_name_the_flag_and_list_columns(tmp_path):
    pq.write_table(pa.table({"img": [b"x"], "description": ["d"]}), tmp_path / "t.parquet")
    with pytest.raises(ValueError, match="--image_column") as info:
        iter_samples(str(tmp_path / "t.parquet"))
    assert "img, description" in str(info.value)
    with pytest.raises(ValueError, match="--caption_column") as info:
        iter_samples(str(tmp_path / "t.parquet"), image_column="img")
    assert "img, description" in str(info.value)
    with pytest.raises(ValueError, match="--caption_column 'txt' is not a column"):
        iter_samples(str(tmp_path / "t.parquet"), image_column="img", caption_column="txt")
    samples = list(
        iter_samples(str(tmp_path / "t.parquet"), image_column="img", caption_column="description")
    )
    assert samples[0].caption == "d" and samples[0].read_bytes() == b"x"


def test_save_to_disk_dataset(tmp_path, images):
    paths = [str(tmp_path / "img" / name) for name in ("a.png", "b.png")]
    dataset = datasets.Dataset.from_dict(
        {"image": paths, "caption": ["x", "y"], "id": [1, 2]}
    ).cast_column("image", datasets.Image())
    dataset.save_to_disk(str(tmp_path / "saved"))
    got = collect(iter_samples(str(tmp_path / "saved")))
    assert got == [
        (f"{tmp_path / 'saved'} row 0", "x", images["a.png"]),
        (f"{tmp_path / 'saved'} row 1", "y", images["b.png"]),
    ]
    # Through load_image: decoded from the raw bytes, not handed over as a PIL image.
    first = next(iter_samples(str(tmp_path / "saved")))
    assert load_image(first.read_bytes(), first.source).size == (64, 64)


def test_save_to_disk_dataset_dict_split(tmp_path, images):
    train = datasets.Dataset.from_dict({"image": [images["a.png"]], "text": ["t"]})
    test = datasets.Dataset.from_dict({"image": [images["c.png"]], "text": ["v"]})
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "dd"))
    assert collect(iter_samples(str(tmp_path / "dd")))[0][1:] == ("t", images["a.png"])
    assert collect(iter_samples(str(tmp_path / "dd"), split="test"))[0][1:] == (
        "v",
        images["c.png"],
    )
    with pytest.raises(ValueError, match="splits present: train, test"):
        iter_samples(str(tmp_path / "dd"), split="validation")


def test_hub_name_goes_to_load_dataset(monkeypatch, tmp_path, images):
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_dict({"image": [images["b.png"]], "text": ["hub"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.chdir(tmp_path)
    got = collect(iter_samples("someone/pets", split="train[:10]"))
    assert calls == [("someone/pets", "train[:10]")]
    assert got == [("someone/pets row 0", "hub", images["b.png"])]


def test_unreachable_hub_name(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # HF_HUB_OFFLINE=1 (conftest): the Hub is never contacted
    with pytest.raises(FileNotFoundError, match="--dataset someone/nonexistent-pets"):
        iter_samples("someone/nonexistent-pets")


@pytest.mark.parametrize("path", ["./nope", "../nope/imgs", "/no/such/dir", "a/b/c", "t.parquet"])
def test_missing_local_path(monkeypatch, tmp_path, path):
    def fail(*args, **kwargs):
        raise AssertionError("a local path must not be looked up on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"--dataset {path}: no such file or folder"):
        iter_samples(path)


def test_unsupported_file_type(tmp_path):
    (tmp_path / "a.png").write_bytes(encode(noise()))
    with pytest.raises(ValueError, match="unsupported file type '.png'"):
        iter_samples(str(tmp_path / "a.png"))


def test_corrupt_parquet(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="bad.parquet"):
        iter_samples(str(tmp_path / "bad.parquet"))


def test_end_to_end_skips_are_reported_per_sample(tmp_path):
    """A folder mixing good and bad files: each bad one is a SkipSample, the good ones load."""
    (tmp_path / "good.png").write_bytes(encode(noise()))
    (tmp_path / "good.txt").write_text("fine")
    (tmp_path / "tiny.png").write_bytes(encode(noise(20, 20)))
    (tmp_path / "tiny.txt").write_text("small")
    (tmp_path / "text.jpg").write_text("hello")
    (tmp_path / "text.txt").write_text("not a picture")
    (tmp_path / "uncaptioned.png").write_bytes(encode(noise()))
    outcomes = {}
    for sample in iter_samples(str(tmp_path)):
        try:
            image = load_image(sample.read_bytes(), sample.source)
            caption = build_caption(sample.caption, sample.source, trigger_phrase="zz")
            outcomes[Path(sample.source).name] = (image.size, caption)
        except SkipSample as skip:
            outcomes[Path(sample.source).name] = skip.reason.split(":")[0].split(" (")[0]
    assert outcomes == {
        "good.png": ((96, 80), "zz, fine"),
        "text.jpg": "not an image, or not one of the formats " + ", ".join(data.DECODE_FORMATS),
        "tiny.png": "too small",
        "uncaptioned.png": "missing caption",
    }
