"""bench/embedded/corpus.py: which files may enter the embedded model's corpus (permissive licences, file by file,
as Debian's machine-readable copyright says) and that the code reserved for evaluation never does."""

from __future__ import annotations

import sys

from helpers import ROOT

sys.path.insert(0, str(ROOT / "bench"))

import embedded.corpus as corpus  # noqa: E402
from embedded.corpus import RESERVED_CRATE, RESERVED_PYTHON, licence_of, permissive, stanzas  # noqa: E402

COPYRIGHT = """\
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: example

Files: *
Copyright: 2020 Someone
License: MIT or Apache-2.0

Files: src/vendored/*
 src/extra.rs
Copyright: 2019 Someone else
License: GPL-3+

Files: debian/*
Copyright: 2021 Debian
License: GPL-2+

License: MIT
 Permission is hereby granted...
"""


def test_each_file_takes_the_licence_of_the_last_stanza_that_matches_it():
    found = stanzas(COPYRIGHT)
    assert licence_of("src/lib.rs", found) == "MIT or Apache-2.0"
    assert licence_of("src/vendored/parse.rs", found) == "GPL-3+"
    assert licence_of("src/extra.rs", found) == "GPL-3+"  # a continuation line of the Files field
    # An installed Python file lies outside the src/ its upstream tree had.
    assert licence_of("vendored/parse.py", found) == "GPL-3+"


def test_only_mit_apache_and_bsd_are_permissive_and_one_alternative_of_an_or_is_enough():
    for expression in ("MIT", "Expat", "Apache-2.0", "BSD-3-clause", "BSD-2-Clause", "MIT or Apache-2.0",
                       "(MIT or Apache-2.0) and BSD-3-clause", "GPL-2+ or MIT"):
        assert permissive(expression), expression
    for expression in ("GPL-3+", "LGPL-2.1+", "MPL-2.0", "Unicode", "PSF-2", "MIT and GPL-2", "MIT-style", "", None):
        assert not permissive(expression), expression


def test_a_copyright_file_that_is_not_machine_readable_admits_nothing():
    found = stanzas("This package was debianized by someone.\n\nLicense: MIT\n")
    assert found == [] and licence_of("pkg/__init__.py", found) is None


def test_the_reserved_code_is_recognised():
    for crate in ("tokio", "tokio-util", "tokio_macros", "tokio-rustls"):
        assert RESERVED_CRATE.match(crate), crate
    assert not RESERVED_CRATE.match("tokiox") and not RESERVED_CRATE.match("mio")
    assert RESERVED_PYTHON == {"python3-requests"}


def test_a_vendored_copy_of_reserved_code_stays_out_with_the_rest_of_its_package_in(tmp_path, monkeypatch):
    dist, doc = tmp_path / "dist-packages", tmp_path / "doc"
    (dist / "pip" / "_vendor" / "requests").mkdir(parents=True)
    (doc / "python3-pip").mkdir(parents=True)
    (doc / "python3-pip" / "copyright").write_text(COPYRIGHT.replace("src/", "pip/"))
    files = [dist / "pip" / "cli.py", dist / "pip" / "_vendor" / "requests" / "api.py"]
    for path in files:
        path.write_text("def f():\n    return 1\n")
    monkeypatch.setattr(corpus, "PYTHON_DIST", f"{dist}/")
    monkeypatch.setattr(corpus, "DOC", doc)
    record = corpus.take("python", ("python3-pip", "pip", "23.0", files), tmp_path / "out", 10**6, seed=0)
    assert record.files == ["python/pip/pip/cli.py"] and record.licence == "MIT or Apache-2.0"
