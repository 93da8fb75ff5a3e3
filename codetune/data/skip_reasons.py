"""Why the repository scan leaves something out: one `SkippedFile` per file or pruned directory, with the first
reason that applied (`codetune.data.files` gives their order). The walk (`codetune.data.walk`) decides by name,
the file checks (`codetune.data.file_checks`) by content.
"""

from dataclasses import dataclass

SKIP_IGNORED = "ignored"
SKIP_EXTENSION = "extension"
SKIP_SECRET_FILE = "secret_file"
SKIP_BINARY = "binary"
SKIP_NOT_UTF8 = "not_utf8"
SKIP_TOO_LARGE = "too_large"
SKIP_MINIFIED = "minified"
SKIP_GENERATED = "generated"
SKIP_DUPLICATE = "duplicate"
SKIP_SYMLINK = "symlink_outside"
SKIP_EMPTY = "empty"
SKIP_CODETUNE_OUTPUT = "codetune_output"


@dataclass(frozen=True)
class SkippedFile:
    """A file or pruned directory (path ending in `/`) that was left out, and why."""

    rel_path: str
    reason: str
    """One of the `SKIP_*` constants."""
