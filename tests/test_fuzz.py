"""Fuzzing the decoders: random and mutated bytes of real JPEG, PNG, GIF, WebP and TIFF files, fed to the scan,
``eval_tensor``/``base_tensor``, ``Model.predict`` and the ``/predict`` endpoint.

Every path must keep the good file, skip or refuse each bad one with a reason that names it, raise nothing but
:class:`DataError`, and finish in bounded time. The seeds are the ants/bees photos (read in place, never copied) and
re-encodings of one of them in every format and mode the decoders meet; each property sees a fixed number of
examples, derandomised, so CI always runs the same ones. ``HEADSTART_FUZZ=N`` multiplies the counts for a deeper run.
"""

from __future__ import annotations

import dataclasses
import io
import os
import struct
import tempfile
import threading
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from datetime import timedelta
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import HYMENOPTERA, stripes
from headstart.data.scan import MAX_JPEG_SCANS, jpeg_scans, list_images, open_image, scan_files, to_rgb
from headstart.data.transforms import MAX_ASPECT, Preprocessing, base_tensor, estimated_bytes, eval_tensor
from headstart.errors import DataError
from headstart.insight.predictor import Model, load
from headstart.models.backbones import create_backbone
from headstart.models.classifier import Classifier, save_classifier
from headstart.serving.serve import create_app, serve_in_thread

SCALE = int(os.environ.get("HEADSTART_FUZZ", "1"))  # more examples for a deeper run than CI's
HARD_LIMIT = 20.0  # seconds one call may take before the test fails as a hang (files here are under 50 KB)
PREP = Preprocessing(32, 36, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")
CLASSES = ["horizontal", "vertical"]
T = TypeVar("T")
# Pillow warns about the corrupt metadata it skips (EXIF, TIFF tags), which fuzzed files are full of.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def fuzz_settings(examples: int) -> settings:
    """Reproducible (derandomised, no example database written) and bounded: a slow example fails the deadline."""
    return settings(
        max_examples=examples * SCALE,
        derandomize=True,
        database=None,
        deadline=timedelta(seconds=10),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=False,
    )


def bounded(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a thread, failing the test if it runs past :data:`HARD_LIMIT` (a hang must not stall CI).

    A stuck codec call cannot be interrupted, so its daemon thread is abandoned; each call gets its own thread, so
    one hang does not turn the examples after it into hangs too.
    """
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = fn(*args)
        except BaseException as error:  # handed to the test's thread, which re-raises it
            result["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    tic = time.perf_counter()
    thread.start()
    thread.join(HARD_LIMIT)
    assert not thread.is_alive(), f"{getattr(fn, '__name__', fn)} still running after {HARD_LIMIT:.0f} s: a hang"
    if "error" in result:
        raise result["error"]
    assert time.perf_counter() - tic < HARD_LIMIT
    return result["value"]  # type: ignore[no-any-return]


# -- seeds -----------------------------------------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (with a valid CRC, so only the size is wrong)."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def jpeg_claiming(photo: Image.Image, width: int, height: int, progressive: bool = False, scans: int = 0) -> bytes:
    """A JPEG of ``photo`` whose frame header claims ``width`` x ``height``, its last scan repeated ``scans`` times.

    Repeated progressive scans are the JPEG CPU bomb: each costs the decoder a pass over every block of the image.
    """
    data = encode(photo, "JPEG", quality=60, progressive=progressive)
    sof = data.find(b"\xff\xc2" if progressive else b"\xff\xc0")
    data = data[: sof + 5] + struct.pack(">HH", height, width) + data[sof + 9 :]
    last = data.rfind(b"\xff\xda")
    return data[:-2] + data[last:-2] * scans + b"\xff\xd9"


def photo_bytes() -> tuple[bytes, bytes]:
    """Two real JPEG photos (a small one, one with EXIF), or synthetic stand-ins where the ants/bees set is absent."""
    small, exif = HYMENOPTERA / "train/ants/formica.jpeg", HYMENOPTERA / "train/ants/0013035.jpg"
    if small.is_file() and exif.is_file():
        return small.read_bytes(), exif.read_bytes()
    rng = np.random.default_rng(0)
    return encode(stripes(0, rng, (193, 130)), "JPEG"), encode(stripes(1, rng, (768, 512)), "JPEG")


@cache
def seeds() -> dict[str, bytes]:
    """Every kind of file the decoders meet: each format, mode and oddity, valid or hostile."""
    photo_jpeg, exif_jpeg = photo_bytes()
    photo = Image.open(io.BytesIO(photo_jpeg)).convert("RGB")
    small = photo.resize((64, 43))  # re-encodings are small so that each example decodes in milliseconds
    frames = [small, small.rotate(90), small.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    gray16 = Image.fromarray(np.asarray(small.convert("L"), dtype=np.uint16) * 257)
    orientation = Image.Exif()
    orientation[0x0112] = 6  # rotate 90 degrees clockwise to display
    found: dict[str, bytes] = {
        "jpeg": photo_jpeg,
        "jpeg_exif": exif_jpeg,
        "jpeg_orientation": encode(small, "JPEG", exif=orientation.tobytes()),
        "jpeg_cmyk": encode(small.convert("CMYK"), "JPEG", quality=80),
        "jpeg_gray_progressive": encode(small.convert("L"), "JPEG", progressive=True),
        "jpeg_truncated": photo_jpeg[: len(photo_jpeg) // 2],
        "jpeg_bomb": jpeg_claiming(small, 60_000, 60_000),
        "jpeg_scan_bomb": jpeg_claiming(Image.new("L", (16, 16), 128), 4000, 4000, progressive=True, scans=300),
        "png": encode(small, "PNG"),
        "png_16bit": encode(gray16, "PNG"),
        "png_palette_transparency": encode(small.quantize(16), "PNG", transparency=0),
        "png_rgba": encode(small.convert("RGBA"), "PNG"),
        "png_flat": encode(Image.new("RGB", (40, 30), (200, 30, 30)), "PNG"),
        "png_tall": encode(Image.new("RGB", (1, 3000), (10, 200, 30)), "PNG"),
        "png_bomb": png_claiming(20_000, 20_000),  # over twice the limit: Pillow refuses it itself
        "png_bomb_near": png_claiming(12_000, 9_000),  # between one and two limits: our own check refuses it
        "png_truncated": encode(small, "PNG")[:-200],
        "gif": encode(small, "GIF"),
        "gif_animated": encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, transparency=0),
        "webp": encode(small, "WEBP", quality=70),
        "webp_lossless_rgba": encode(small.convert("RGBA"), "WEBP", lossless=True),
        "webp_animated": encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=50),
        "tiff": encode(small, "TIFF"),
        "tiff_lzw": encode(small, "TIFF", compression="tiff_lzw"),
        "tiff_multipage": encode(
            frames[0], "TIFF", save_all=True, append_images=frames[1:], compression="tiff_deflate"
        ),
        "tiff_16bit": encode(gray16, "TIFF"),
        "bmp": encode(small, "BMP"),
    }
    gif = HYMENOPTERA / "train/ants/imageNotFound.gif"  # a real GIF, as published
    if gif.is_file():
        found["gif_real"] = gif.read_bytes()
    return found


# -- mutations -------------------------------------------------------------------------------------------------------

MAGIC = {
    "jpeg": b"\xff\xd8\xff\xe0\x00\x10JFIF\x00",
    "png": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
    "gif": b"GIF89a",
    "webp": b"RIFF\x00\x10\x00\x00WEBPVP8 ",
    "tiff_le": b"II*\x00\x08\x00\x00\x00",
    "tiff_be": b"MM\x00*\x00\x00\x00\x08",
    "bmp": b"BM",
}
EXTREMES = [0, 1, 2, 255, 0x7FFF, 0x8000, 0xFFFF, 46_341, 0x10000, 0x7FFF_FFFF, 0xFFFF_FFFF]


@dataclasses.dataclass(frozen=True)
class Fuzzed:
    """A seed and what was done to it; shown, short, when an example fails (its bytes would not be)."""

    seed: str
    mutation: str
    args: tuple[Any, ...]
    data: bytes = dataclasses.field(repr=False)


@st.composite
def fuzzed(draw: st.DrawFn) -> Fuzzed:
    """A seed left as it is or mutated: byte flips, a cut, a duplicated or inserted chunk, the header alone, random
    bytes behind a valid magic number, or a header field set to an extreme value."""
    name = draw(st.sampled_from(sorted(seeds())))
    data = bytearray(seeds()[name])
    n = len(data)
    offset = st.integers(0, n - 1)
    header = st.integers(0, min(n, 96) - 1)  # sizes, counts and offsets live here: flipped more often
    kind = draw(st.sampled_from(["none", "flip", "truncate", "duplicate", "insert", "header", "magic", "field"]))
    if kind == "flip":
        args: tuple[Any, ...] = tuple(draw(st.lists(st.tuples(st.one_of(header, offset), st.integers(1, 255)),
                                                    min_size=1, max_size=8)))  # fmt: skip
        for i, mask in args:
            data[i] ^= mask
    elif kind == "truncate":
        args = (draw(st.integers(1, n - 1)),)
        data = data[: args[0]]
    elif kind == "duplicate":
        args = (draw(offset), draw(st.integers(1, 1024)), draw(offset), draw(st.integers(1, 4)))
        start, length, at, times = args
        data[at:at] = data[start : start + length] * times
    elif kind == "insert":
        args = (draw(offset), draw(st.binary(min_size=1, max_size=64)))
        data[args[0] : args[0]] = args[1]
    elif kind == "header":
        args = (draw(st.integers(1, 64)),)
        data = data[: args[0]]
    elif kind == "magic":
        args = (draw(st.sampled_from(sorted(MAGIC))), draw(st.binary(max_size=2048)))
        data = bytearray(MAGIC[args[0]] + args[1])
    elif kind == "field":
        args = (draw(st.integers(0, min(n, 96) - 4)), draw(st.sampled_from([">H", "<H", ">I", "<I"])),
                draw(st.sampled_from(EXTREMES)))  # fmt: skip
        struct.pack_into(args[1], data, args[0], args[2] & (0xFFFF if "H" in args[1] else 0xFFFF_FFFF))
    else:
        args = ()
    return Fuzzed(name, kind, args, bytes(data))


def write_pair(folder: Path, fuzz: Fuzzed) -> tuple[Path, Path]:
    """A good photo and the fuzzed file, side by side in ``folder``."""
    good, bad = folder / "good.jpg", folder / f"fuzzed-{fuzz.seed}.img"
    good.write_bytes(seeds()["jpeg"])
    bad.write_bytes(fuzz.data)
    return good, bad


def check_decodes(source: Path | bytes) -> None:
    """What the loaders make of a file the scan kept: the inference crop, and the training base image."""
    crop = bounded(eval_tensor, source, PREP)
    assert crop.dtype == torch.uint8 and tuple(crop.shape) == (3, PREP.input_size, PREP.input_size)
    base = bounded(base_tensor, source, PREP)
    assert base.dtype == torch.uint8 and base.shape[0] == 3 and min(base.shape[1:]) == PREP.resize_size
    assert max(base.shape[1:]) <= MAX_ASPECT * PREP.resize_size + 1


# -- (a) the scan ----------------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
@fuzz_settings(300)
@given(fuzz=fuzzed())
def test_scan_keeps_the_good_file_and_skips_a_bad_one_with_a_reason(fuzz: Fuzzed) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        _, bad = write_pair(Path(tmp), fuzz)
        records, skipped = bounded(scan_files, list_images(Path(tmp)))
        kept = {r.path.name: r for r in records}
        assert "good.jpg" in kept
        if bad.name in kept:  # it decodes: then the loaders, which trust the scan, decode it too
            event("kept")
            assert kept[bad.name].width >= 1 and kept[bad.name].height >= 1
            check_decodes(bad)
        else:
            event(f"skipped: {skipped[0].reason.split(' (')[0].split(':')[0][:40]}")  # --hypothesis-show-statistics
            assert [(s.path.name, bool(s.reason.strip()), s.reason != "unknown") for s in skipped] == [
                (bad.name, True, True)
            ]


# -- (b) tensors from bytes ------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
@fuzz_settings(500)
@given(fuzz=fuzzed())
def test_eval_tensor_gives_a_crop_or_a_data_error_naming_the_file(fuzz: Fuzzed) -> None:
    try:
        check_decodes(fuzz.data)
    except DataError as error:
        assert str(error).startswith("<bytes>: ") and len(str(error)) > len("<bytes>: ") + 3
        with pytest.raises(DataError, match=r"^upload\.bin: \S"):  # the name given replaces <bytes>
            bounded(open_image, fuzz.data, 64, "upload.bin")


# -- (c) predict on files --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, tiny_weights: Path) -> Path:
    """A saved tiny_cnn classifier: the model files predict and the service load."""
    run = tmp_path_factory.mktemp("fuzz") / "run"
    torch.manual_seed(0)
    save_classifier(Classifier(create_backbone("tiny_cnn", weights=str(tiny_weights)), 2).eval(), run,
                    {"classes": CLASSES})  # fmt: skip
    return run


@pytest.mark.timeout(300)
def test_predict_reports_bad_files_and_predicts_good_ones(run_dir: Path) -> None:
    model = load(run_dir)

    @fuzz_settings(50)
    @given(fuzz=fuzzed())
    def predict_pair(fuzz: Fuzzed) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            good, bad = write_pair(Path(tmp), fuzz)
            rows, failed = bounded(predict_quietly, model, [good, bad])
            predicted = {row.path.name: row for row in rows}
            assert "good.jpg" in predicted and predicted["good.jpg"].label in CLASSES
            assert 0.0 <= predicted["good.jpg"].probability <= 1.0
            if bad.name not in predicted:
                assert [(path.name, bool(reason.strip())) for path, reason in failed] == [(bad.name, True)]
            else:
                assert not failed

    predict_pair()


def predict_quietly(model: Model, files: list[Path]) -> tuple[list[Any], list[tuple[Path, str]]]:
    """``model.predict`` in this process (two files make one batch: no worker processes to start per example)."""
    return model.predict(files, top_k=2, batch_size=32)


# -- (d) /predict over HTTP ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(run_dir: Path) -> Iterator[httpx.Client]:
    with serve_in_thread(create_app(run_dir)) as url, httpx.Client(base_url=url, timeout=HARD_LIMIT) as c:
        yield c


@pytest.mark.timeout(300)
def test_predict_endpoint_answers_200_or_400_naming_the_upload_never_500(client: httpx.Client) -> None:
    @fuzz_settings(100)
    @given(fuzz=fuzzed())
    def post(fuzz: Fuzzed) -> None:
        name = f"{fuzz.seed}-{fuzz.mutation}.img"
        response = client.post("/predict", files={"files": (name, fuzz.data, "application/octet-stream")})
        assert response.status_code in (200, 400), (response.status_code, response.text)
        if response.status_code == 400:
            detail = response.json()["detail"]
            assert detail.startswith(f"{name}: ") and len(detail) > len(name) + 5, detail
        else:
            [result] = response.json()["results"]
            assert result["filename"] == name and result["label"] in CLASSES

    post()
    # Still alive, and still right, after every hostile upload.
    assert client.get("/health").json()["status"] == "ok"
    good = client.post("/predict", files={"files": ("good.jpg", seeds()["jpeg"], "image/jpeg")})
    assert good.status_code == 200 and good.json()["results"][0]["label"] in CLASSES


# -- what the fuzzing found, pinned ----------------------------------------------------------------------------------


def test_jpeg_scan_bomb_is_refused_before_decoding(tmp_path: Path) -> None:
    """An 11 KB progressive JPEG claiming 9000x9000 pixels with 1,000 scans took 7 s to decode; now refused at once."""
    bomb = jpeg_claiming(Image.new("L", (16, 16), 128), 9000, 9000, progressive=True, scans=1000)
    assert len(bomb) < 20_000 and jpeg_scans(bomb) > 1000
    tic = time.perf_counter()
    with pytest.raises(DataError, match=r"^upload\.jpg: 1,0\d\d JPEG scans exceed the limit of 100"):
        open_image(bomb, name="upload.jpg")
    assert time.perf_counter() - tic < 1.0
    (tmp_path / "bomb.jpg").write_bytes(bomb)
    records, skipped = scan_files([tmp_path / "bomb.jpg"])
    assert not records and "JPEG scans" in skipped[0].reason


def test_ordinary_jpegs_are_far_below_the_scan_limit() -> None:
    photo = Image.open(io.BytesIO(seeds()["jpeg"])).convert("RGB")
    assert jpeg_scans(encode(photo, "JPEG")) == 1
    assert jpeg_scans(encode(photo, "JPEG", progressive=True)) == 10
    assert jpeg_scans(encode(photo.convert("CMYK"), "JPEG", progressive=True)) == 18
    assert jpeg_scans(seeds()["jpeg_exif"]) <= 10  # a camera file: EXIF segment skipped by its length
    # Marker-like bytes inside a metadata segment are not scans; a second picture (MPO) is not decoded.
    app = b"\xff\xe5" + struct.pack(">H", 2 + 400) + b"\xff\xda" * 200
    baseline = encode(photo, "JPEG")
    assert jpeg_scans(baseline[:2] + app + baseline[2:]) == 1
    assert jpeg_scans(encode(photo, "MPO", save_all=True, append_images=[photo] * 3)) == 1
    assert MAX_JPEG_SCANS == 100


def test_a_long_thin_image_trains_from_its_centre_without_exhausting_memory(tmp_path: Path) -> None:
    """A 474-byte PNG of 1x100,000 pixels passed the scan, then asked base_tensor for a 20 GB tensor."""
    line = encode(Image.new("RGB", (1, 100_000), (10, 200, 30)), "PNG")
    assert len(line) < 1000
    (tmp_path / "line.png").write_bytes(line)
    [record], _ = scan_files([tmp_path / "line.png"])
    base = bounded(base_tensor, line, PREP)
    assert tuple(base.shape) == (3, MAX_ASPECT * PREP.resize_size, PREP.resize_size)
    assert estimated_bytes([record], PREP) == base.numel()
    assert tuple(eval_tensor(line, PREP).shape) == (3, PREP.input_size, PREP.input_size)
    wide = Image.fromarray(np.tile(np.arange(900, dtype=np.uint8) % 251, (100, 1)), "L")  # 9:1, cut to 8:1
    assert tuple(base_tensor(encode(wide, "PNG"), PREP).shape) == (3, PREP.resize_size, MAX_ASPECT * PREP.resize_size)


def test_sixteen_bit_greys_convert_in_little_memory_to_the_same_pixels() -> None:
    """A 157 KB PNG of 9000x9000 16-bit greys took 16 s and 2 GB to convert in float64; now a table lookup."""
    rng = np.random.default_rng(0)
    sixteen = Image.fromarray(rng.integers(0, 65536, (1000, 1100), dtype=np.uint16))
    wide = Image.fromarray(rng.integers(-9, 70_000, (1000, 1100), dtype=np.int32))  # 32-bit: more than one chunk
    for image in (sixteen, wide):
        tracemalloc.start()
        rgb = to_rgb(image)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        if image.mode == "I;16":
            assert peak < 6 * image.width * image.height  # a float64 copy alone was 8 bytes a pixel
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode == "I;16" or array.max() > 255 else 255.0
        expected = np.clip(array / top * 255.0, 0, 255).astype(np.uint8)  # what the float64 arithmetic gave
        assert np.array_equal(np.asarray(rgb)[..., 1], expected), image.mode


@pytest.mark.parametrize(
    ("seed", "reason"),
    [
        ("jpeg_truncated", "truncated image"),
        ("png_truncated", "truncated image"),
        ("jpeg_bomb", "decompression bomb"),
        ("png_bomb", "decompression bomb"),
        ("png_bomb_near", "decompression bomb"),
        ("jpeg_scan_bomb", "JPEG scans exceed"),
    ],
)
def test_hostile_seeds_are_skipped_with_their_reason(seed: str, reason: str, tmp_path: Path) -> None:
    (tmp_path / f"{seed}.img").write_bytes(seeds()[seed])
    _, skipped = scan_files([tmp_path / f"{seed}.img"])
    assert len(skipped) == 1 and reason in skipped[0].reason


def test_every_valid_seed_decodes() -> None:
    hostile = {"jpeg_truncated", "png_truncated", "jpeg_bomb", "png_bomb", "png_bomb_near", "jpeg_scan_bomb"}
    for name, data in seeds().items():
        if name not in hostile:
            check_decodes(data)


def test_predict_names_the_reason_a_file_was_dropped(run_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "good.jpg").write_bytes(seeds()["jpeg"])
    (tmp_path / "notes.jpg").write_bytes(b"shopping list\n" * 20)
    (tmp_path / "cut.png").write_bytes(seeds()["png_truncated"])
    rows, failed = load(run_dir).predict(tmp_path, batch_size=32)
    assert [row.path.name for row in rows] == ["good.jpg"]
    assert {path.name: reason.split(":")[0] for path, reason in failed} == {
        "notes.jpg": "not an image",
        "cut.png": "truncated image",
    }


@pytest.mark.parametrize(
    "data",
    [
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto showpage\n",  # handed to Ghostscript
        b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n",
    ],
    ids=["eps", "pdf"],
)
def test_formats_outside_the_allow_list_are_not_images(data: bytes, tmp_path: Path) -> None:
    """Pillow knows EPS (run through Ghostscript, outside code) and more; headstart lets it identify only the image
    formats it documents, so such a file is skipped as not an image before any plugin runs."""
    import PIL.EpsImagePlugin

    opened: list[bytes] = []
    original = PIL.EpsImagePlugin.EpsImageFile._open

    def spy(self: PIL.EpsImagePlugin.EpsImageFile) -> None:
        opened.append(b"eps")
        original(self)

    PIL.EpsImagePlugin.EpsImageFile._open = spy  # type: ignore[method-assign]
    try:
        (tmp_path / "figure.jpg").write_bytes(data)
        _, skipped = scan_files([tmp_path / "figure.jpg"])
        with pytest.raises(DataError, match="not an image"):
            open_image(data, name="upload.jpg")
    finally:
        PIL.EpsImagePlugin.EpsImageFile._open = original  # type: ignore[method-assign]
    assert len(skipped) == 1 and skipped[0].reason == "not an image"
    assert not opened  # the EPS plugin never parsed the file
