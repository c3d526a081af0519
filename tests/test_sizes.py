"""Sizes as people write them: units, bare numbers (GiB), auto, and the one-line errors."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.errors import FlashflexError
from orchestrator.sizes import (
    GiB,
    KiB,
    MiB,
    TiB,
    format_rate,
    format_size,
    parse_budget,
    parse_rate,
    parse_size,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2GiB", 2 * GiB),
        ("1.5G", int(1.5 * GiB)),
        ("512MiB", 512 * MiB),
        ("300MB", 300_000_000),
        ("4096B", 4096),
        ("4096b", 4096),
        ("64K", 64 * KiB),
        ("64KB", 64_000),
        ("1TiB", TiB),
        ("2 gib", 2 * GiB),
        (" 0.5 ", GiB // 2),
        ("0.5", GiB // 2),
        ("2", 2 * GiB),
        (".25G", GiB // 4),
        ("1e3MB", 1_000_000_000),
        (2, 2 * GiB),
        (0.5, GiB // 2),
    ],
)
def test_parse_size_units(text, expected):
    assert parse_size(text) == expected


def test_bare_number_means_gib_like_flexinfer_am():
    assert parse_size("0.5") == parse_size("0.5GiB") == parse_size("512MiB")
    assert parse_size("2") == parse_size("2G")


@pytest.mark.parametrize("text", ["2XB", "12 parsecs", "GiB", "", "-1G", "1.2.3G", "2GiBs", "nan"])
def test_bad_sizes_raise_one_line_errors(text):
    with pytest.raises(FlashflexError) as info:
        parse_size(text, what="budget")
    line = info.value.one_line()
    assert "\n" not in line
    assert line.startswith("budget:")


def test_unknown_unit_names_the_units():
    with pytest.raises(FlashflexError, match="unknown unit 'XB'") as info:
        parse_size("2XB")
    assert "GiB" in (info.value.fix or "")


def test_huge_bare_number_is_refused_as_probable_bytes():
    with pytest.raises(FlashflexError, match="bare number"):
        parse_size("4294967296")
    assert parse_size("4096B") == 4096


def test_bool_is_not_a_size():
    with pytest.raises(FlashflexError):
        parse_size(True)  # type: ignore[arg-type]


def test_auto_is_available_minus_headroom():
    assert parse_budget("auto", available=8 * GiB) == 7 * GiB
    assert parse_budget("AUTO", headroom="512MiB", available=8 * GiB) == 8 * GiB - 512 * MiB
    assert parse_budget("auto", headroom=0, available=3 * GiB) == 3 * GiB


def test_auto_reads_psutil_when_not_given():
    n = parse_budget("auto", headroom="1MiB")
    assert n > 0


def test_auto_without_room_raises():
    with pytest.raises(FlashflexError, match="headroom"):
        parse_budget("auto", available=GiB // 2)


def test_explicit_budget_and_zero():
    assert parse_budget("2GiB") == 2 * GiB
    with pytest.raises(FlashflexError, match="zero"):
        parse_budget("0")


def test_rates():
    assert parse_rate("1.1GB/s") == 1_100_000_000
    assert parse_rate("500MiB/s") == 500 * MiB
    assert parse_rate("1") == GiB
    with pytest.raises(FlashflexError, match="bandwidth"):
        parse_rate("fast")


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0 B"), (300, "300 B"), (1536, "1.50 KiB"), (512 * MiB, "512 MiB"), (int(23.4 * MiB), "23.4 MiB"),
     (2 * GiB, "2.00 GiB"), (3 * TiB, "3.00 TiB")],
)
def test_format_size(n, text):
    assert format_size(n) == text


def test_format_size_round_up_never_understates():
    assert format_size(int(1.2341 * GiB), round_up=True) == "1.24 GiB"
    assert format_size(GiB, round_up=True) == "1.00 GiB"


def test_format_rate():
    assert format_rate(1_100_000_000) == "1.10 GB/s"
    assert format_rate(500) == "500 B/s"


@given(st.integers(min_value=1, max_value=1 << 50))
def test_format_then_parse_is_close(n):
    text = format_size(n).replace(" ", "")
    back = parse_size(text)
    assert abs(back - n) <= max(n * 0.01, 1)


@given(st.integers(min_value=0, max_value=1 << 50))
def test_rounded_up_format_is_never_below(n):
    assert parse_size(format_size(n, round_up=True).replace(" ", "")) >= n - 1
