"""End to end: secrets planted in a repository never reach a training or validation window.

A fixture repository holds kept `.py`/`.rs` files with one secret of every kind that
`codetune.data.secrets` redacts, and secret files (`.env`, `id_rsa`, `server.pem`, a credentials
JSON, `secrets.toml`) whose sentinel values no content detector would catch, so only the
secret-file rule keeps them out. `CodeDataModule.setup` runs the real pipeline (scan, tiny
tokenizer, token cache, packing); the windows of each split are joined back into one token stream
and decoded, so a secret cut in two by a window boundary is still found.

Values come from a seeded RNG and prefixes are joined at run time: no credential-shaped literal is
committed, and scanning this repository finds nothing here.
"""

from __future__ import annotations

import random
import string
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from helpers import write_fixture_repo

from codetune.data.datamodule import CodeDataModule
from codetune.data.packing import Windows
from codetune.data.secrets import REDACTED

BASE62 = string.ascii_letters + string.digits
BASE64 = BASE62 + "+/"
UPPER_DIGITS = string.ascii_uppercase + string.digits
# Ordinary code next to the secrets: it must survive, or the test could pass on an empty stream.
KEPT_IDENTIFIERS = ("handshake_roundtrip", "upload_release_artifacts", "notify_build_channel")

# Secret files, by path: `.env`, `id_rsa` and `server.pem` have no kept extension anyway, while the
# credentials JSON and `secrets.toml` would be read (".json" and ".toml" are kept) but for the rule.
SECRET_FILES = (".env", "deploy/id_rsa", "certs/server.pem", "config/credentials.json", "config/secrets.toml")


@dataclass(frozen=True)
class Planted:
    """A planted secret: its redaction kind (None: lives in a secret file) and the strings that must vanish."""

    kind: str | None
    value: str
    fragments: tuple[str, ...]


class Secrets:
    """Random, reproducible secret values of every kind, with the substrings a leak would show."""

    def __init__(self, seed: int = 7) -> None:
        rng = random.Random(seed)

        def chars(alphabet: str, n: int) -> str:
            return "".join(rng.choice(alphabet) for _ in range(n))

        self.pem_label = "RSA " + "PRIVATE" + " KEY"
        self.pem_body = [chars(BASE64, 64) for _ in range(5)] + [chars(BASE64, 20) + "=="]
        self.aws = "AK" + "IA" + chars(UPPER_DIGITS, 16)
        self.github = "gh" + "p_" + chars(BASE62, 36)
        self.slack = "xo" + "xb-" + chars(string.digits, 11) + "-" + chars(string.digits, 13) + "-" + chars(BASE62, 24)
        self.password = chars(BASE62, 24)
        self.api_key = chars(BASE62, 32)
        self.file_sentinels = {name: "sentinel" + chars(BASE62, 24) for name in SECRET_FILES}

    def planted(self) -> list[Planted]:
        pem = Planted("private_key", self.pem_block(),
                      (f"BEGIN {self.pem_label}", *self.pem_body, *(line[:20] for line in self.pem_body)))
        return [
            pem,
            Planted("aws_access_key", self.aws, (self.aws, self.aws[4:])),
            Planted("github_token", self.github, (self.github, self.github[4:24])),
            Planted("slack_token", self.slack, (self.slack, self.slack[5:25])),
            Planted("generic_secret", self.password, (self.password, self.password[:20])),
            Planted("generic_secret", self.api_key, (self.api_key, self.api_key[:20])),
            *(Planted(None, value, (value, value[8:28])) for value in self.file_sentinels.values()),
        ]

    def pem_block(self) -> str:
        return "\n".join([f"-----BEGIN {self.pem_label}-----", *self.pem_body, f"-----END {self.pem_label}-----"])


def rust_source(s: Secrets) -> str:
    key = "api" + "_key"
    return textwrap.dedent('''\
        const TEST_KEY: &str = r#"{pem}"#;

        pub fn handshake_roundtrip(payload: &[u8]) -> usize {{
            let {key}: &str = "{api_key}";
            payload.len() + {key}.len() + TEST_KEY.len()
        }}
        ''').format(pem=s.pem_block(), key=key, api_key=s.api_key)


def python_source(s: Secrets) -> str:
    return textwrap.dedent(f'''\
        import os

        AWS_ACCESS_KEY_ID = "{s.aws}"
        GITHUB_TOKEN = "{s.github}"
        SLACK_BOT = "{s.slack}"
        {"pass" + "word"} = "{s.password}"


        def upload_release_artifacts(paths):
            return [os.path.basename(p) for p in paths]


        def notify_build_channel(message):
            return SLACK_BOT, message
        ''')


def secret_file_text(rel_path: str, sentinel: str) -> str:
    """Content no detector redacts (no secret-named key): only the secret-file rule keeps it out."""
    if rel_path.endswith(".json"):
        return f'{{"client_id": "{sentinel}", "type": "service_account"}}\n'
    if rel_path.endswith(".toml"):
        return f'account = "{sentinel}"\n'
    return f"{sentinel}\n"


def write_secret_repo(root: Path, s: Secrets) -> Path:
    write_fixture_repo(root)
    (root / "src" / "net").mkdir()
    (root / "src" / "net" / "tls.rs").write_text(rust_source(s))
    (root / "py" / "deploy.py").write_text(python_source(s))
    for rel_path in SECRET_FILES:
        path = root / rel_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secret_file_text(rel_path, s.file_sentinels[rel_path]))
    return root


def decoded_stream(tokenizer, windows: Windows) -> str:
    """The split's text: real tokens of every window, joined in order, decoded once."""
    ids = np.concatenate([row[:n] for row, n in zip(windows.input_ids, windows.n_real)])
    return tokenizer.decode(ids.tolist(), clean_up_tokenization_spaces=False)


@pytest.fixture
def secrets() -> Secrets:
    return Secrets()


@pytest.fixture
def datamodule(tmp_path: Path, secrets: Secrets) -> CodeDataModule:
    repo = write_secret_repo(tmp_path / "repo", secrets)
    # fim_rate 0: the windows decoded in order are then the files' text (FIM samples fill window gaps, which would
    # cut a left-to-right file's text apart). Redaction is on the text, before any FIM cut (tests/data/test_fim.py).
    dm = CodeDataModule(repo=str(repo), tokenizer="tiny", seq_len=64, batch_size=2, gradient_accumulation_steps=1,
                        extensions=[".py", ".rs", ".json", ".toml"], fim_rate=0.0, cache_dir=str(tmp_path / "cache"))
    dm.setup("fit")
    return dm


def test_no_planted_secret_reaches_a_window(datamodule: CodeDataModule, secrets: Secrets) -> None:
    assert len(datamodule.train_windows) and len(datamodule.val_windows)
    splits = (datamodule.train_windows, datamodule.val_windows)
    text = "\n".join(decoded_stream(datamodule.tokenizer, windows) for windows in splits)
    leaks = [(p.kind or "secret file", fragment) for p in secrets.planted() for fragment in p.fragments
             if fragment in text]
    assert leaks == []
    assert all(name in text for name in KEPT_IDENTIFIERS)
    # One placeholder per redacted secret: the code around each secret was kept, only the value went.
    assert text.count(REDACTED) == 6


def test_the_report_counts_each_kind_and_every_secret_file(datamodule: CodeDataModule) -> None:
    scan = datamodule.report["phase_1_scan"]
    assert scan["secrets_redacted"] == {
        "aws_access_key": 1, "generic_secret": 2, "github_token": 1, "private_key": 1, "slack_token": 1,
    }
    assert scan["files_skipped"]["secret_file"] == len(SECRET_FILES)
