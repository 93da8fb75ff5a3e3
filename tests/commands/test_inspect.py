"""`codetune inspect REPO`: language table, skipped files, recommended config, JSON, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import PY_FILE, RUST_FILE

from codetune.__main__ import main
from codetune.data.files import count_lines

RUST_LINES, PY_LINES = count_lines(RUST_FILE), count_lines(PY_FILE)


def inspect_json(capsys, *args: str) -> dict:
    assert main(["inspect", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def rust_crate(root: Path) -> Path:
    """Mostly Rust, with a README longer than the code (prose does not count against the share)."""
    (root / "src").mkdir(parents=True)
    for i in range(5):
        (root / "src" / f"m{i}.rs").write_text(RUST_FILE.replace("Counter", f"Counter{i}"))
    (root / "build.py").write_text("print('codegen helper')\n")
    (root / "README.md").write_text("".join(f"Line {i} of the docs.\n" for i in range(500)))
    (root / "Cargo.toml").write_text('[package]\nname = "demo"\nversion = "0.1.0"\n')
    (root / "Cargo.lock").write_text("# lockfile\n")
    return root


def test_mixed_repo_report(fixture_repo, tmp_path, capsys):
    report = inspect_json(capsys, str(fixture_repo), "--cache_dir", str(tmp_path / "cache"))
    by_lang = {r["language"]: r for r in report["languages"]}
    assert set(by_lang) == {"rust", "python"}
    assert by_lang["rust"]["files"] == 7 and by_lang["python"]["files"] == 6
    assert by_lang["python"]["lines"] == 6 * PY_LINES and by_lang["rust"]["lines"] == 6 * RUST_LINES + 4
    assert report["totals"]["tokens"] == sum(r["tokens"] for r in report["languages"]) > 0
    assert report["files_skipped"] == {"binary": 1, "extension": 1, "ignored": 3}
    assert report["skipped_examples"]["ignored"] == ["debug.log", "ignored_dir/", "target/"]
    # 7 Rust files vs 6 Python files of similar length: about half Rust, not more than 70%.
    rust = 6 * RUST_LINES + 4
    assert report["rust_share_of_code_lines"] == pytest.approx(rust / (rust + 6 * PY_LINES), abs=1e-4)
    assert report["recommended_config"] == "default"
    assert report["token_cache"]["misses"] == 13 and report["token_cache"]["hits"] == 0
    again = inspect_json(capsys, str(fixture_repo), "--cache_dir", str(tmp_path / "cache"))
    assert again["token_cache"]["hits"] == 13 and again["token_cache"]["misses"] == 0
    assert again["languages"] == report["languages"]


def test_inspect_counts_with_the_tokenizer_fit_trains_and_warms_its_cache(fixture_repo, tmp_path, capsys):
    from codetune.data.datamodule import CodeDataModule

    report = inspect_json(capsys, str(fixture_repo), "--cache_dir", str(tmp_path / "cache"))
    # fim_rate 0: FIM samples add sentinels, which inspect does not count (it counts files, not samples).
    module = CodeDataModule(repo=str(fixture_repo), seq_len=64, fim_rate=0.0, cache_dir=str(tmp_path / "cache"))
    module.setup("fit")
    tokenize = module.report["phase_2_tokenize"]
    assert (tokenize["cache_hits"], tokenize["cache_misses"]) == (13, 0), "fit reads what inspect wrote"
    assert tokenize["train_tokens"] + tokenize["val_tokens"] == report["totals"]["tokens"] + 13  # + one EOS per file


def test_rust_crate_gets_the_rust_config_in_the_table(tmp_path, capsys):
    crate = rust_crate(tmp_path / "crate")
    assert main(["inspect", str(crate), "--tokenizer", "none"]) == 0
    out = capsys.readouterr().out
    assert "kept files per language" in out and "(not code)" in out and "tokens" not in out.split("Skipped")[0]
    assert f"codetune fit --config rust --data.repo {crate.resolve()}" in out and "make train-rust REPO=" in out
    assert "Cargo.lock" in out  # skipped, as a lockfile, with its reason
    report = inspect_json(capsys, str(crate), "--tokenizer", "none")
    assert report["recommended_config"] == "rust"
    assert report["totals"]["tokens"] is None and report["token_cache"] is None
    assert report["rust_share_of_code_lines"] == pytest.approx(5 * RUST_LINES / (5 * RUST_LINES + 1), abs=1e-4)


@pytest.mark.parametrize(("make_path", "message"), [
    (lambda tmp: tmp / "missing", "does not exist"),
    (lambda tmp: (tmp / "file.rs").write_text("fn main() {}\n") and tmp / "file.rs", "is not a directory"),
])
def test_bad_repo_is_one_clear_error(tmp_path, capsys, make_path, message):
    assert main(["inspect", str(make_path(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("codetune inspect: error: REPO") and message in err and "Traceback" not in err


def test_bad_extension_names_the_flag(fixture_repo, capsys):
    assert main(["inspect", str(fixture_repo), "--extensions", "rs"]) == 2
    assert "--extensions ['rs'] are not supported" in capsys.readouterr().err
    assert main(["inspect", str(fixture_repo), "--tokenizer", str(fixture_repo / "no-such-model")]) == 2
    assert f"--tokenizer {str(fixture_repo / 'no-such-model')!r}: no such directory" in capsys.readouterr().err


def test_inspect_never_imports_the_training_stack(fixture_repo):
    """Seconds matter: inspect must not pay for importing Lightning, peft or bitsandbytes."""
    code = ("import sys; from codetune.__main__ import main; "
            f"main(['inspect', {str(fixture_repo)!r}, '--json', '--tokenizer', 'none']); "
            "print(sorted(m for m in ('lightning', 'peft', 'bitsandbytes', 'torch') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_lightning_cli_entry_forwards_inspect(fixture_repo, capsys):
    from codetune.__main__ import main as cli_main

    assert cli_main(["inspect", str(fixture_repo), "--json", "--tokenizer", "none"]) == 0
    assert json.loads(capsys.readouterr().out)["totals"]["files"] == 13


def secret_repo(root: Path) -> Path:
    """Five generic secrets in four files, and a GitHub token on line 3 of one of them."""
    import random
    import string

    def value(seed: int) -> str:
        return "".join(random.Random(seed).choices(string.ascii_letters + string.digits, k=24))

    (root / "cfg").mkdir(parents=True)
    for i in range(4):
        (root / "cfg" / f"s{i}.py").write_text(f'import os\n\npassword = "{value(i)}"\n')
    (root / "cfg" / "s0.py").write_text(f'import os\n\npassword = "{value(0)}"\napi_key = "{value(9)}"\n')
    token = "ghp_" + value(5) + value(6)[:12]
    (root / "gh.py").write_text(f'"""Client."""\n\nTOKEN = "{token}"\n')
    return root


def test_inspect_names_where_each_secret_kind_was_found(tmp_path, capsys, monkeypatch):
    repo = secret_repo(tmp_path / "repo")
    report = inspect_json(capsys, str(repo), "--tokenizer", "none")
    assert report["secrets_redacted"] == {"generic_secret": 5, "github_token": 1}
    assert report["secret_locations"] == {
        "generic_secret": ["cfg/s0.py:3", "cfg/s0.py:4", "cfg/s1.py:3", "cfg/s2.py:3", "cfg/s3.py:3"],
        "github_token": ["gh.py:3"],
    }
    monkeypatch.setenv("COLUMNS", "200")  # one table row per kind, unwrapped
    assert main(["inspect", str(repo), "--tokenizer", "none"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if "generic_secret" in line)
    assert "cfg/s0.py:3, cfg/s0.py:4, cfg/s1.py:3 and 2 more" in row
    assert "gh.py:3" in next(line for line in out.splitlines() if "github_token" in line)


def test_inspect_reports_codetune_output_as_skipped(fixture_repo, capsys):
    run_dir = fixture_repo / "my-runs" / "r1"
    run_dir.mkdir(parents=True)
    (run_dir / "MANIFEST.json").write_text('{"phase_results": {}}\n')
    (run_dir / "config.yaml").write_text("data:\n  repo: .\n")
    report = inspect_json(capsys, str(fixture_repo), "--tokenizer", "none")
    assert report["totals"]["files"] == 13
    assert report["files_skipped"]["codetune_output"] == 1
    assert report["skipped_examples"]["codetune_output"] == ["my-runs/r1/"]


def test_inspect_reports_the_fim_samples_fit_would_make(fixture_repo, tmp_path, capsys):
    from codetune.data.datamodule import CodeDataModule

    report = inspect_json(capsys, str(fixture_repo), "--cache_dir", str(tmp_path / "cache"), "--seq_len", "64")
    module = CodeDataModule(repo=str(fixture_repo), seq_len=64, cache_dir=str(tmp_path / "cache"))
    module.setup("fit")
    fit = module.report["phase_2_tokenize"]["fim"]
    assert report["fim"]["fim"] > 0
    assert {k: report["fim"][k] for k in ("pieces", "fim", "psm", "spm", "rate")} == {
        k: fit[k] for k in ("pieces", "fim", "psm", "spm", "rate")}
    assert main(["inspect", str(fixture_repo), "--cache_dir", str(tmp_path / "cache"), "--seq_len", "64"]) == 0
    assert f"{fit['fim']} of {fit['pieces']} training pieces become FIM samples" in capsys.readouterr().out


# -- what inspect says while it works, and what it leaves on disk -------------------------------------------------


def test_the_token_cache_is_reported_with_what_it_holds_and_what_was_added(fixture_repo, tmp_path, capsys):
    cache = tmp_path / "cache"
    report = inspect_json(capsys, str(fixture_repo), "--cache_dir", str(cache))
    entry = report["token_cache"]
    directory = Path(entry["dir"])
    assert directory.parent == cache / "tokens"
    # 4 bytes a token id, plus the tokenizer's line-break table that the FIM plan keeps beside them.
    held = 4 * report["totals"]["tokens"] + (directory / "newlines.npy").stat().st_size
    assert entry["bytes"] == entry["bytes_added"] == held
    assert main(["inspect", str(fixture_repo), "--cache_dir", str(cache), "--json"]) == 0
    captured = capsys.readouterr()
    again = json.loads(captured.out)["token_cache"]
    assert (again["bytes"], again["bytes_added"], again["hits"]) == (held, 0, 13)
    assert captured.err == "", "--json: stdout is the report; stderr says nothing when the cache did not grow"

    fresh = tmp_path / "fresh"
    assert main(["inspect", str(fixture_repo), "--cache_dir", str(fresh), "--json"]) == 0
    err = capsys.readouterr().err
    assert err.startswith(f"codetune inspect: {fresh}/tokens/") and err.count("\n") == 1
    assert f"holds {held / 1e6:.1f} MB ({held / 1e6:.1f} MB added now;" in err and "--cache_dir none" in err
    assert main(["inspect", str(fixture_repo), "--cache_dir", str(fresh)]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[-1].startswith(f"Token cache: {fresh}/tokens/") and "nothing added now" in \
        captured.out.splitlines()[-1]
    assert captured.err == "", "stderr is not a terminal here: no status line"


def test_the_status_line_tells_each_step_and_how_far_tokenizing_is(fixture_repo, tmp_path, monkeypatch):
    import codetune.commands.inspect_repo as inspect
    from codetune.data.files import (DEFAULT_EXTENSIONS, DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_LINE_LENGTH,
                                     scan_repository)
    from codetune.data.split import DEFAULT_VAL_FRACTION, split_paths

    monkeypatch.setattr(inspect, "TOKENIZE_CHUNK_BYTES", 1)  # a chunk per file
    told: list[str] = []
    args = (fixture_repo, DEFAULT_EXTENSIONS, [], DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_LINE_LENGTH, "tiny",
            str(tmp_path / "cache"))
    report = inspect.inspect_repository(*args, status=told.append)
    assert told[0] == f"scanning {fixture_repo}"
    read = told[1].removeprefix(f"scanning {fixture_repo}: read ").removesuffix(" files").split(" / ")
    assert read[0] == read[1] and int(read[0]) >= 13  # the last file read (every candidate, kept or skipped)
    kept = [f.rel_path for f in scan_repository(fixture_repo, DEFAULT_EXTENSIONS).files]
    assert told[2].startswith(f"training the 'tiny' tokenizer on {len(split_paths(kept, DEFAULT_VAL_FRACTION)[0])} "
                              f"files (0.0 MB)")
    assert [t.split(" files")[0] for t in told[3:-1]] == [f"tokenizing: {i} / 13" for i in range(13)]
    assert told[-1] == "planning the fill-in-the-middle samples"
    told.clear()
    assert inspect.inspect_repository(*args, status=told.append)["totals"] == report["totals"]
    assert told[-2].startswith("tokenizing: 12 / 13 files (") and told[-2].endswith(", 12 from the cache")


def test_the_status_line_is_drawn_on_a_terminal_and_erased(fixture_repo, tmp_path, capsys, monkeypatch):
    import io

    from rich.console import Console

    import codetune.commands.inspect_repo as inspect

    monkeypatch.setattr(inspect, "TOKENIZE_CHUNK_BYTES", 1)
    terminal = io.StringIO()
    stderr = Console(file=terminal, force_terminal=True, width=200)
    assert inspect.main([str(fixture_repo), "--cache_dir", "none", "--json"], stderr=stderr) == 0
    drawn = terminal.getvalue()
    assert "codetune inspect: scanning" in drawn and "codetune inspect: tokenizing: 12 / 13 files" in drawn
    assert drawn.endswith("\x1b[2K") or drawn.rstrip("\r\n").endswith("\x1b[2K"), "the line is erased at the end"
    assert json.loads(capsys.readouterr().out)["token_cache"]["dir"] is None


def test_a_repository_without_code_is_said_to_be_refused_by_fit(tmp_path, capsys):
    repo = tmp_path / "docs"
    repo.mkdir()
    (repo / "README.md").write_text("# notes\n")
    assert main(["inspect", str(repo), "--tokenizer", "none"]) == 0
    out = capsys.readouterr().out
    assert "No source code: the scan kept 1 file, README.md (markdown)" in out
    assert "`codetune fit` refuses this repository" in out and "Recommended config" not in out
    report = inspect_json(capsys, str(repo), "--tokenizer", "none")
    assert report["no_code"].startswith("the scan kept 1 file, README.md")
