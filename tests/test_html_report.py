"""The HTML picture: its SVG parsed with xml.etree, and the page opened in a real headless browser.

The results are the hand-built fixtures of test_report.py (invented numbers, no tracing, no GPU).
The browser test runs where /usr/bin/chromium exists (`apt-get install -y chromium`) and skips elsewhere.
"""

from __future__ import annotations

import re
import struct
import subprocess
import xml.etree.ElementTree as ElementTree
import zlib
from pathlib import Path

import numpy as np
import pytest
from test_report import (
    FIT_RESULTS,
    budget_lora_result,
    cards_result,
    gpu_verified_result,
    nothing_fits_result,
)

from memtune.report import html as html_report
from memtune.report import words
from memtune.search.choose import FITS, VERIFIED

SVG = "{http://www.w3.org/2000/svg}"
CHROMIUM = Path("/usr/bin/chromium")


def svg_of(page: str) -> ElementTree.Element:
    match = re.search(r"<svg\b.*?</svg>", page, re.S)
    assert match, "the page has no inline <svg>"
    return ElementTree.fromstring(match.group(0))


def classes(element: ElementTree.Element) -> set[str]:
    return set(element.get("class", "").split())


def find_all(root: ElementTree.Element, tag: str, css_class: str) -> list[ElementTree.Element]:
    return [element for element in root.iter(f"{SVG}{tag}") if css_class in classes(element)]


def expected_bars(result) -> int:
    if result.card_plans:
        return sum(1 for card in result.card_plans if card.search.chosen is not None or card.search.evaluated)
    return len(result.search.evaluated)


@pytest.mark.parametrize("name", list(FIT_RESULTS))
def test_one_bar_per_candidate_a_budget_line_and_the_chosen_mark(name):
    result = FIT_RESULTS[name]()
    svg = svg_of(html_report.render_html(result))
    bars = find_all(svg, "g", "bar")
    assert len(bars) == expected_bars(result)
    assert find_all(svg, "line", "budget-line"), "no budget line"
    assert find_all(svg, "rect", "margin"), "no safety margin band"
    chosen = [bar for bar in bars if "chosen" in classes(bar)]
    marks = [mark for bar in chosen for mark in find_all(bar, "rect", "chosen-mark")]
    if result.card_plans:
        assert len(chosen) == sum(1 for card in result.card_plans if card.search.chosen is not None)
    else:
        assert len(chosen) == (1 if result.search.chosen is not None else 0)
    assert len(marks) == len(chosen)
    for bar in bars:  # each bar is stacked by category, in the terminal report's colours
        segments = find_all(bar, "rect", "segment")
        assert segments
        for segment in segments:
            category = next(c.removeprefix("category-") for c in classes(segment) if c.startswith("category-"))
            assert segment.get("fill") == words.category_colour(category)
    legend = {swatch.get("fill") for swatch in find_all(svg, "rect", "swatch")}
    used = {segment.get("fill") for bar in bars for segment in find_all(bar, "rect", "segment")}
    assert used <= legend


def tick_scale(svg: ElementTree.Element) -> tuple[float, float]:
    """(x of 0 GiB, pixels per GiB) from the axis tick labels."""
    axis = find_all(svg, "g", "axis")[0]
    ticks = [
        (float(text.get("x")), float(text.text))
        for text in axis.iter(f"{SVG}text")
        if re.fullmatch(r"[0-9.]+", text.text or "")
    ]
    (x0, v0), (x1, v1) = ticks[0], ticks[-1]
    return x0, (x1 - x0) / (v1 - v0)


def test_bars_end_left_of_the_usable_line_exactly_when_they_fit():
    result = gpu_verified_result()
    svg = svg_of(html_report.render_html(result))
    x0, per_gib = tick_scale(svg)
    usable_x = float(find_all(svg, "line", "usable-line")[0].get("x1"))
    budget_x = float(find_all(svg, "line", "budget-line")[0].get("x1"))
    assert usable_x == pytest.approx(x0 + per_gib * result.search.usable_bytes / 2**30, abs=0.1)
    assert budget_x == pytest.approx(x0 + per_gib * result.search.budget_bytes / 2**30, abs=0.1)
    for bar, candidate in zip(find_all(svg, "g", "bar"), result.search.evaluated, strict=True):
        end = max(float(rect.get("x")) + float(rect.get("width")) for rect in find_all(bar, "rect", "segment"))
        assert (end <= usable_x) == (candidate.status in (FITS, VERIFIED)), candidate.config.describe()
    measured = find_all(svg, "path", "measured")
    assert len(measured) == 1 and "measured" in measured[0].find(f"{SVG}title").text


def test_card_plans_draw_a_budget_per_card():
    svg = svg_of(html_report.render_html(cards_result()))
    assert len(find_all(svg, "line", "budget-line")) == len(cards_result().card_plans)
    labels = [text.text for text in find_all(svg, "text", "bar-label")]
    assert labels[0].startswith("16 GiB: smallest") and "does not fit" in labels[0]


def test_nothing_fits_page_says_the_shortfall_and_marks_nothing():
    result = nothing_fits_result()
    page = html_report.render_html(result)
    assert "nothing fits" in page and "short by" in page
    assert not find_all(svg_of(page), "rect", "chosen-mark")
    for suggestion in result.search.suggestions:
        assert suggestion.replace("(", "").split()[0] in page


def test_the_page_is_self_contained_and_states_the_facts(tmp_path):
    result = budget_lora_result()
    path = html_report.write_html(result, tmp_path / "sub" / "fit.html")
    assert path == tmp_path / "sub" / "fit.html" and path.is_file()
    page = path.read_text()
    assert "<script" not in page
    assert re.findall(r"https?://[^\s\"'<]+", page) == [
        "http://www.w3.org/2000/svg"
    ]  # the SVG namespace, never fetched
    assert not re.search(r"\b(src|href)=", page)
    assert "chosen: micro-batch 2 x 8 accum, bf16, checkpointing, LoRA r=16 (all-linear)" in page
    assert "LoraConfig(" in page and "not verified (no GPU)" in page and "memtune run plans/llama.json" in page


def test_text_is_escaped():
    result = gpu_verified_result()
    result.source.name = "<b>odd & model</b>"
    page = html_report.render_html(result)
    assert "<b>odd" not in page and "&lt;b&gt;odd &amp; model&lt;/b&gt;" in page
    svg_of(page)  # still well-formed XML


# ---- a real browser ---------------------------------------------------------------------------------


def read_png(path: Path) -> np.ndarray:
    """The pixels (height x width x channels, uint8) of an 8-bit, non-interlaced RGB or RGBA PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    position, idat, header = 8, b"", None
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        chunk = data[position + 8:position + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        position += 12 + length
    width, height, depth, colour_type, _, _, interlace = header
    assert depth == 8 and colour_type in (2, 6) and interlace == 0, header
    pixel = 3 if colour_type == 2 else 4
    stride = width * pixel
    raw = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(height, stride + 1)
    image = np.zeros((height, stride), dtype=np.uint8)
    previous = np.zeros(stride, dtype=np.uint8)
    for y in range(height):  # undo each row's filter (PNG spec, section 9)
        kind, line = raw[y, 0], raw[y, 1:]
        if kind == 0:
            row = line.copy()
        elif kind == 1:  # Sub: a running sum along the row, per channel
            row = (
                (np.cumsum(line.reshape(width, pixel), axis=0, dtype=np.uint64) % 256).astype(np.uint8).reshape(stride)
            )
        elif kind == 2:  # Up
            row = line + previous
        else:  # Average and Paeth depend on the byte to the left: byte by byte
            row, above, current = bytearray(line.tobytes()), previous.tobytes(), bytearray(stride)
            for i in range(stride):
                a = current[i - pixel] if i >= pixel else 0
                b = above[i]
                if kind == 3:
                    predictor = (a + b) >> 1
                else:
                    c = above[i - pixel] if i >= pixel else 0
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    predictor = a if pa <= pb and pa <= pc else b if pb <= pc else c
                current[i] = (row[i] + predictor) & 255
            row = np.frombuffer(bytes(current), dtype=np.uint8)
        image[y] = row
        previous = image[y]
    return image.reshape(height, width, pixel)


def chromium(*arguments: str, profile: Path) -> subprocess.CompletedProcess:
    command = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
               f"--user-data-dir={profile}", *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium (apt-get install -y chromium)")
def test_a_headless_browser_renders_the_figure(tmp_path):
    page = html_report.write_html(gpu_verified_result(), tmp_path / "fit.html")
    dumped = chromium("--dump-dom", page.as_uri(), profile=tmp_path / "profile-dom")
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    dom = dumped.stdout
    assert "<svg" in dom and 'class="bar chosen"' in dom and 'class="budget-line"' in dom

    screenshot = tmp_path / "fit.png"
    shot = chromium(
        f"--screenshot={screenshot}", "--window-size=1200,900", page.as_uri(), profile=tmp_path / "profile-png"
    )
    assert shot.returncode == 0 and screenshot.is_file(), shot.stderr[-2000:]
    pixels = read_png(screenshot)
    assert pixels.shape[:2] == (900, 1200)
    image = pixels[:, :, :3].astype(np.int32)
    packed = (image[:, :, 0] << 16) | (image[:, :, 1] << 8) | image[:, :, 2]
    assert len(np.unique(packed)) > 20, "the screenshot is (nearly) blank"

    def count(hex_colour: str, tolerance: int = 4) -> int:
        target = np.frombuffer(bytes.fromhex(hex_colour.lstrip("#")), dtype=np.uint8).astype(np.int32)
        return int((np.abs(image - target) <= tolerance).all(axis=2).sum())

    # The figure is above the fold: its bars are painted in the category colours, the budget line in red.
    for category in ("weights", "optimizer", "activations"):
        assert count(words.CATEGORY_COLOURS[category]) > 500, f"no {category} bar in the screenshot"
    assert count(html_report.BUDGET_COLOUR) > 50, "no budget line in the screenshot"


def test_the_png_reader_undoes_every_filter(tmp_path):
    """read_png against a PNG written here with known pixels, one row per filter type
    (None, Sub, Up, Average, Paeth)."""
    pixels = np.random.default_rng(0).integers(0, 256, (5, 4, 3), dtype=np.uint8)

    def predictor(kind: int, i: int, line: list[int], above: list[int]) -> int:
        a, b, c = (line[i - 3] if i >= 3 else 0), above[i], (above[i - 3] if i >= 3 else 0)
        if kind < 3:
            return (0, a, b)[kind]
        if kind == 3:
            return (a + b) >> 1
        p = a + b - c
        return a if abs(p - a) <= abs(p - b) and abs(p - a) <= abs(p - c) else b if abs(p - b) <= abs(p - c) else c

    raw, above = b"", [0] * 12
    for kind in range(5):  # row `kind` uses filter `kind`
        line = [int(value) for value in pixels[kind].reshape(-1)]
        raw += bytes([kind]) + bytes((line[i] - predictor(kind, i, line, above)) & 255 for i in range(12))
        above = line

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path = tmp_path / "known.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 5, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    assert (read_png(path) == pixels).all()
