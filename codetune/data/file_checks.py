"""What a file's bytes say about it, once the walk has chosen to read it: too large, binary, not UTF-8 text,
empty, minified or generated (duplicates are found by the scan, which knows the files kept before).

The checks run in that order: too large (more than `max_file_bytes`), binary (a NUL byte in the first 8 KiB,
git's own test), not_utf8 (text that does not decode, see below), empty (whitespace only), minified (a line
longer than `max_line_length`, or an average line longer than a quarter of it), generated (a generator's
marker in the first 2 KiB, see `GENERATED_MARKER`).

**Decoding rule.** UTF-8, strictly. If that fails, the file is decoded with `errors="replace"`
and kept if the replacement characters that decoding introduced number less than 1% of its
bytes (a Latin-1 accent in a comment), otherwise it is skipped as `not_utf8` (Latin-1 or
Windows-1252 prose, Shift-JIS, truncated UTF-8): text, but not in the encoding a tokenizer expects.
UTF-16 has a NUL in every ASCII character, so it is `binary` by the NUL test, as in git. A
leading byte-order mark is dropped and CRLF line ends become LF, so the text and its line count do not
depend on the platform that wrote the file.
"""

import re

from codetune.data.skip_reasons import (SKIP_BINARY, SKIP_EMPTY, SKIP_GENERATED, SKIP_MINIFIED, SKIP_NOT_UTF8,
                                        SKIP_TOO_LARGE)

# Case-sensitive on purpose: "do not edit" in prose is common, the upper-case form is a generator's. One letter of
# each phrase is bracketed so that this file's own first lines do not carry the markers it looks for.
GENERATED_MARKER = re.compile(
    r"@generate[d]|DO NOT EDI[T]|Code generate[d] by|[Aa]utomatically generate[d] by|[Aa]uto-generate[d] by"
)

BINARY_SNIFF_BYTES = 8192
GENERATED_SNIFF_CHARS = 2048
MAX_INVALID_UTF8_FRACTION = 0.01

_UTF8_REPLACEMENT = "\ufffd".encode()


def is_binary(raw: bytes) -> bool:
    """Git's test: a NUL byte in the first 8 KiB."""
    return b"\x00" in raw[:BINARY_SNIFF_BYTES]


def decode_source(raw: bytes) -> str | None:
    """Decode the bytes of a file that is not binary (`is_binary`) per the module's decoding rule; None
    means "not UTF-8 text"."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        # U+FFFD already present in the file is content, not a decoding error.
        n_invalid = text.count("\ufffd") - raw.count(_UTF8_REPLACEMENT)
        if n_invalid >= MAX_INVALID_UTF8_FRACTION * len(raw):
            return None
    return text.removeprefix("\ufeff").replace("\r\n", "\n")


def text_or_skip_reason(
    raw: bytes, max_file_bytes: int, max_line_length: int
) -> tuple[str | None, str | None]:
    """`(text, None)` for file bytes worth training on, else `(None, reason)`."""
    if len(raw) > max_file_bytes:
        return None, SKIP_TOO_LARGE
    if is_binary(raw):
        return None, SKIP_BINARY
    text = decode_source(raw)
    if text is None:
        return None, SKIP_NOT_UTF8
    reason = text_skip_reason(text, max_line_length)
    return (None, reason) if reason else (text, None)


def text_skip_reason(text: str, max_line_length: int) -> str | None:
    """Why decoded text is not worth training on (empty, minified, generated), or None."""
    if not text.strip():
        return SKIP_EMPTY
    line_lengths = list(map(len, text.split("\n")))
    # An average line over a quarter of the limit catches minifiers that wrap at a fixed width.
    if max(line_lengths) > max_line_length or len(text) > len(line_lengths) * max_line_length / 4:
        return SKIP_MINIFIED
    if GENERATED_MARKER.search(text, 0, GENERATED_SNIFF_CHARS):
        return SKIP_GENERATED
    return None
