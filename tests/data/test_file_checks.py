"""What a file's bytes say, checked without a walk: the order of the content checks, git's NUL test, the
decoding rule and the minified and generated tests' limits."""

from codetune.data.file_checks import (BINARY_SNIFF_BYTES, GENERATED_SNIFF_CHARS, decode_source, is_binary,
                                       text_or_skip_reason, text_skip_reason)
from codetune.data.skip_reasons import (SKIP_BINARY, SKIP_EMPTY, SKIP_GENERATED, SKIP_MINIFIED, SKIP_NOT_UTF8,
                                        SKIP_TOO_LARGE)


def test_the_checks_run_in_order_too_large_first():
    assert text_or_skip_reason(b"\x00" * 11, max_file_bytes=10, max_line_length=100) == (None, SKIP_TOO_LARGE)
    assert text_or_skip_reason(b"a\x00b", 10, 100) == (None, SKIP_BINARY)
    assert text_or_skip_reason("é".encode("latin-1") * 3, 10, 100) == (None, SKIP_NOT_UTF8)
    assert text_or_skip_reason(b" \r\n", 10, 100) == (None, SKIP_EMPTY)
    assert text_or_skip_reason(b"fn a() {}\r\n", 100, 100) == ("fn a() {}\n", None)


def test_a_nul_counts_only_in_the_first_8_kib():
    assert is_binary(b"a" * (BINARY_SNIFF_BYTES - 1) + b"\x00")
    assert not is_binary(b"a" * BINARY_SNIFF_BYTES + b"\x00")


def test_decoding_keeps_a_few_bad_bytes_and_drops_the_bom():
    good = "x" * 199
    assert decode_source(good.encode() + b"\xe9") == good + "\ufffd"  # 1 bad byte in 200: under 1%
    assert decode_source(b"x" * 99 + b"\xe9") is None  # 1 in 100: not UTF-8 text
    assert decode_source("\ufeffa\r\nb".encode()) == "a\nb"
    # A replacement character written in the file is content, not a decoding error.
    assert decode_source(("\ufffd" * 10).encode() + b"x" * 200) == "\ufffd" * 10 + "x" * 200


def test_minified_by_the_longest_line_or_the_average_one():
    assert text_skip_reason("a" * 101, max_line_length=100) == SKIP_MINIFIED
    assert text_skip_reason("a" * 100 + "\n" + "b\n" * 3, max_line_length=100) is None  # 107 chars in 5 lines
    assert text_skip_reason(("a" * 30 + "\n") * 10, max_line_length=100) == SKIP_MINIFIED  # average over 25
    assert text_skip_reason(("a" * 20 + "\n") * 10, max_line_length=100) is None


def test_a_generators_marker_counts_only_near_the_top_and_in_its_own_case():
    assert text_skip_reason("// @generated\nfn a() {}\n", 1000) == SKIP_GENERATED
    assert text_skip_reason("# do not edit this by hand\n", 1000) is None
    late = "\n" * GENERATED_SNIFF_CHARS + "// DO NOT EDIT\n"
    assert text_skip_reason(late, 1000) is None


def test_codetunes_own_source_is_not_taken_for_generated_or_minified():
    """The demo trains on this repository: the file holding the generator markers must not look generated."""
    from helpers import ROOT

    own = sorted((ROOT / "codetune").rglob("*.py")) + sorted((ROOT / "callbacks").glob("*.py"))
    skipped = {str(p.relative_to(ROOT)): text_skip_reason(p.read_text(encoding="utf-8"), 1000) for p in own}
    assert {path: reason for path, reason in skipped.items() if reason not in (None, SKIP_EMPTY)} == {}
