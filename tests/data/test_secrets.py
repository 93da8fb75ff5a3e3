"""Secret files and secret redaction: every planted kind is removed and counted, lookalikes stay.

Tokens are generated at test time from a seeded RNG, so no credential-shaped literal is committed.
"""

import random
import string

import pytest

from codetune.data.secrets import (REDACTED, SecretFinding, find_and_redact_secrets, is_secret_file, looks_random,
                                   redact_secrets, shannon_entropy)

ALNUM = string.ascii_letters + string.digits


def random_token(n: int, seed: int, alphabet: str = ALNUM) -> str:
    return "".join(random.Random(seed).choices(alphabet, k=n))


def pem_block(label: str) -> str:
    body = "\n".join(random_token(64, seed, ALNUM + "+/") for seed in range(5))
    return f"-----BEGIN {label}-----\n{body}\n-----END {label}-----"


@pytest.mark.parametrize(
    ("rel_path", "expected"),
    [
        (".env", True),
        ("deploy/.env.production", True),
        ("certs/server.pem", True),
        ("tls/server.key", True),
        ("home/.ssh/id_rsa", True),
        ("id_ed25519.pub", True),
        ("gcp/credentials-prod.json", True),
        ("store.p12", True),
        (".netrc", True),
        ("src/main.rs", False),
        ("src/env.rs", False),
        ("docs/keys.md", False),
        ("credentials.rs", False),
        ("environment.py", False),
    ],
)
def test_is_secret_file(rel_path: str, expected: bool) -> None:
    assert is_secret_file(rel_path) is expected


@pytest.mark.parametrize(
    ("kind", "secret"),
    [
        ("private_key", pem_block("RSA PRIVATE KEY")),
        ("private_key", pem_block("OPENSSH PRIVATE KEY")),
        ("private_key", pem_block("PRIVATE KEY")),
        ("aws_access_key", "AKIA" + random_token(16, 1, string.ascii_uppercase + string.digits)),
        ("aws_access_key", "ASIA" + random_token(16, 2, string.ascii_uppercase + string.digits)),
        ("github_token", "ghp_" + random_token(36, 3)),
        ("github_token", "gho_" + random_token(36, 4)),
        ("github_token", "ghu_" + random_token(36, 5)),
        ("github_token", "ghs_" + random_token(36, 6)),
        ("github_token", "ghr_" + random_token(36, 7)),
        ("github_token", "github_pat_" + random_token(22, 8) + "_" + random_token(59, 9)),
        ("gitlab_token", "glpat-" + random_token(20, 10)),
        ("slack_token", "xoxb-1234567890-" + random_token(24, 11)),
        ("slack_token", "xoxp-1234567890-" + random_token(24, 12)),
    ],
)
def test_token_is_replaced_whole_and_counted(kind: str, secret: str) -> None:
    text = f'fn main() {{\n    let s = r#"{secret}"#;\n}}\n'
    redacted, counts = redact_secrets(text)
    assert redacted == f'fn main() {{\n    let s = r#"{REDACTED}"#;\n}}\n'
    assert counts == {kind: 1}


def test_pem_block_in_escaped_string_literal_is_replaced() -> None:
    block = pem_block("EC PRIVATE KEY").replace("\n", "\\n")
    text = f'KEY = "{block}"\nprint(KEY)\n'
    assert redact_secrets(text) == (f'KEY = "{REDACTED}"\nprint(KEY)\n', {"private_key": 1})


VALUE = random_token(24, 42)
HEX_VALUE = random_token(32, 43, "0123456789abcdef")


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (f'password = "{VALUE}"', f'password = "{REDACTED}"'),  # Python
        (f"self.db_password = '{VALUE}'", f"self.db_password = '{REDACTED}'"),
        (f'connect(password="{VALUE}")', f'connect(password="{REDACTED}")'),
        (f'const API_KEY: &str = "{VALUE}";', f'const API_KEY: &str = "{REDACTED}";'),  # Rust
        (f'let token: &\'static str = "{VALUE}";', f'let token: &\'static str = "{REDACTED}";'),
        (f'secret_key = "{HEX_VALUE}"', f'secret_key = "{REDACTED}"'),  # TOML, hex value
        (f"api_key: {VALUE}", f"api_key: {REDACTED}"),  # YAML, unquoted
        (f"client_secret: '{VALUE}'  # prod", f"client_secret: '{REDACTED}'  # prod"),
        (f'{{"accessToken": "{VALUE}"}}', f'{{"accessToken": "{REDACTED}"}}'),  # JSON
        (f"export AUTH_TOKEN={VALUE}", f"export AUTH_TOKEN={REDACTED}"),  # .env / shell
        (f"PassWord={VALUE}", f"PassWord={REDACTED}"),  # key names are case-insensitive
        (f'private-key => "{VALUE}"', f'private-key => "{REDACTED}"'),
    ],
)
def test_random_assigned_value_is_redacted(line: str, expected: str) -> None:
    assert redact_secrets(line + "\n") == (expected + "\n", {"generic_secret": 1})


@pytest.mark.parametrize(
    "text",
    [
        'password = "changeme"',  # short
        'token = "your_token_here"',  # no digit, low entropy
        'password = "changeme_changeme_1"',  # low entropy
        "password = get_password()",  # code
        'api_key = os.environ["API_KEY"]',
        "password = DEFAULT_PASSWORD_V2",  # a constant
        "secret = self.vault.secret_value_2",  # an attribute path
        "def sign(private_key: PKCS7PrivateKeyTypes, data: bytes):",  # a parameter's type
        f'key = "{VALUE}"',  # "key" alone is a map key, not a credential
        f'tokenizer = "{VALUE}"',  # another word that starts with "token"
        f'password = "{REDACTED}"',  # already redacted
        "Files carry '-----BEGIN RSA PRIVATE KEY-----' and '-----END RSA PRIVATE KEY-----' lines.",
        "AKIA_PREFIX = 'AKIA'",
    ],
)
def test_lookalikes_are_kept(text: str) -> None:
    assert redact_secrets(text + "\n") == (text + "\n", {})


def test_key_and_value_must_share_a_line() -> None:
    text = f'if path == "/api/token":\n    result = "{VALUE}"\n'
    assert redact_secrets(text) == (text, {})


def test_every_kind_counted_in_one_text_and_redaction_is_idempotent() -> None:
    aws = "AKIA" + random_token(16, 20, string.ascii_uppercase + string.digits)
    github = "ghp_" + random_token(36, 21)
    text = f'{pem_block("RSA PRIVATE KEY")}\naws = "{aws}"\ngh = "{github}"\npassword = "{VALUE}"\n'
    redacted, counts = redact_secrets(text)
    assert redacted == f'{REDACTED}\naws = "{REDACTED}"\ngh = "{REDACTED}"\npassword = "{REDACTED}"\n'
    assert counts == {"private_key": 1, "aws_access_key": 1, "github_token": 1, "generic_secret": 1}
    assert redact_secrets(redacted) == (redacted, {})


def test_each_secret_is_found_on_its_line_of_the_original_text() -> None:
    """Two 7-line PEM blocks become one line each; what follows them is still found on the file's line."""
    github = "ghp_" + random_token(36, 21)
    lines = ["import os", pem_block("RSA PRIVATE KEY"), f'gh = "{github}"', "", pem_block("EC PRIVATE KEY"),
             f'password = "{VALUE}"', f'token = "{github}"  # again']
    text = "\n".join(lines) + "\n"
    redacted, findings = find_and_redact_secrets(text)
    assert redacted == f'import os\n{REDACTED}\ngh = "{REDACTED}"\n\n{REDACTED}\npassword = "{REDACTED}"\n' \
                       f'token = "{REDACTED}"  # again\n'
    # PEM blocks at lines 2-8 and 11-17 of the original.
    assert findings == [SecretFinding("private_key", 2), SecretFinding("private_key", 11),
                        SecretFinding("github_token", 9), SecretFinding("github_token", 19),
                        SecretFinding("generic_secret", 18)]
    assert redact_secrets(text) == (redacted, {"private_key": 2, "github_token": 2, "generic_secret": 1})


def test_shannon_entropy_exact_values() -> None:
    assert shannon_entropy("") == 0.0
    assert shannon_entropy("aaaa") == 0.0
    assert shannon_entropy("aabb") == 1.0
    assert shannon_entropy("abcd") == 2.0
    assert shannon_entropy("0123456789abcdef") == 4.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (VALUE, True),
        (HEX_VALUE, True),
        ("0123456789abcdef", True),  # hex, 4.0 bits
        ("abcdefghijklmnop", False),  # no digit
        ("1234567890123456", False),  # no letter
        ("aB3dE5gH7jK9mN1", False),  # 15 characters
        ("test_test_test_1", False),  # 2.5 bits
    ],
)
def test_looks_random(value: str, expected: bool) -> None:
    assert looks_random(value) is expected
