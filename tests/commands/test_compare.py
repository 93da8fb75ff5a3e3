"""`codetune compare`: metrics with deltas against the first run, config differences, JSON, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from codetune.__main__ import main
from codetune.commands.compare import (IGNORED_CONFIG_KEYS, LoadedRun, compare_runs, config_diff, flatten_config,
                                       run_labels)


def manifest(name: str | None, train_loss: float | None, chrf: float | None = None, peak_vram: float | None = None,
             steps: int = 100, **config: object) -> dict:
    training = {"status": "completed", "training_stats": {"final_train_loss": train_loss, "final_val_loss": 3.0,
                                                          "final_perplexity": 20.0, "optimizer_steps": steps,
                                                          "tokens_trained": 1000 * steps}}
    if peak_vram is not None:
        training["peak_vram_gb"] = peak_vram
    phases = {"phase_2_tokenize": {"train_tokens": 5000, "train_windows": 40}, "phase_4_training": training}
    if chrf is not None:
        phases["phase_5_evaluation"] = {"base": {"perplexity": 40.0, "chrf": 0.2},
                                        "final": {"perplexity": 20.0, "chrf": chrf},
                                        "delta": {"perplexity": -20.0, "chrf": chrf - 0.2}}
    data = {"run_name": name, "status": "completed", "training_time_minutes": 2.0, "phase_results": phases,
            "config": {"run_name": name, "runs_dir": "runs", "trainer": {"default_root_dir": f"runs/{name}"},
                       "model": {"lora_rank": 8, "learning_rate": 2e-4}, **config}}
    return {k: v for k, v in data.items() if v is not None}


def loaded(*manifests: dict) -> list[LoadedRun]:
    return [LoadedRun(f"runs/{i}", Path(f"runs/{i}/MANIFEST.json"), m) for i, m in enumerate(manifests)]


def metrics_by_name(report: dict) -> dict[str, dict]:
    return {row["name"]: row for row in report["metrics"]}


def write_run(root: Path, data: dict, file_name: str = "MANIFEST.json") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / file_name).write_text(json.dumps(data))
    return root / file_name


def test_deltas_against_the_first_run_follow_each_rows_direction():
    report = compare_runs(loaded(manifest("a", 2.73, chrf=0.30), manifest("b", 2.31, chrf=0.25, steps=150),
                                 manifest("c", 2.73, chrf=0.40, peak_vram=5.5)))
    rows = metrics_by_name(report)
    loss = rows["final_train_loss"]
    assert loss["values"] == [2.73, 2.31, 2.73] and loss["better"] == "lower"
    assert loss["deltas"][0] is None and loss["deltas"][1] == pytest.approx(-0.42) and loss["deltas"][2] == 0
    assert loss["verdicts"] == [None, "better", "same"]
    chrf = rows["eval_final_chrf"]
    assert chrf["deltas"][1:] == pytest.approx([-0.05, 0.10]) and chrf["verdicts"] == [None, "worse", "better"]
    # Counts change without being better or worse; integers stay integers.
    steps = rows["optimizer_steps"]
    assert steps["deltas"] == [None, 50, 0] and steps["verdicts"] == [None, None, None]
    assert rows["tokens_trained"]["deltas"] == [None, 50_000, 0]
    # A value the baseline lacks has no delta; it is still shown.
    assert rows["peak_vram_gb"]["values"] == [None, None, 5.5] and rows["peak_vram_gb"]["deltas"] == [None] * 3
    assert rows["status"]["values"] == ["completed"] * 3 and rows["status"]["deltas"] == [None] * 3
    assert report["baseline"] == "a" and [r["label"] for r in report["runs"]] == ["a", "b", "c"]



def test_missing_and_malformed_values_are_none_not_crashes():
    broken = {"run_name": "broken", "phase_results": {"phase_4_training": "not a dict"}, "config": ["not", "a dict"]}
    report = compare_runs(loaded(manifest("a", 2.5), {}, broken))
    rows = metrics_by_name(report)
    assert rows["final_train_loss"]["values"] == [2.5, None, None]
    assert rows["final_train_loss"]["deltas"] == [None, None, None]
    assert report["config_missing"] == ["1", "broken"] and report["config_diff"] == []


def test_table_shows_dashes_and_hides_rows_no_run_has(tmp_path, capsys):
    a = write_run(tmp_path / "a", manifest("a", 2.73, peak_vram=6.0))
    b = write_run(tmp_path / "b", {"run_name": "b", "status": "failed", "failed_phase": "phase_4_training"})
    assert main(["compare", str(a.parent), str(b.parent)]) == 0
    out = capsys.readouterr().out
    lines = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") == 4}
    assert "—" in lines["final train loss"] and "2.73" in lines["final train loss"]
    assert "failed" in lines["status"] and "phase_4_training" in lines["failed phase"]
    assert "6" in lines["peak VRAM (GB)"]
    assert not any(label.startswith("eval ") for label in lines), "no run has an evaluation: no eval rows"
    assert "training segments" not in lines
    assert "No config recorded in: b" in out


def test_segments_are_counted_when_present():
    resumed = {**manifest("r", 2.0), "segments": [{"steps": 50}, {"steps": 50}]}
    rows = metrics_by_name(compare_runs(loaded(manifest("a", 2.0), resumed)))
    assert rows["segments"]["values"] == [None, 2]


def test_flatten_config_keeps_lists_and_empty_dicts_whole():
    assert flatten_config({"model": {"lora_rank": 8, "targets": ["q", "v"], "extra": {}}, "seed": 1}) == {
        "model.lora_rank": 8, "model.targets": ["q", "v"], "model.extra": {}, "seed": 1}


def test_config_diff_skips_where_runs_were_written_and_marks_missing_keys():
    first = {"run_name": "a", "runs_dir": "runs", "trainer": {"default_root_dir": "runs/a", "max_steps": 4},
             "checkpoint": {"dirpath": "runs/a/checkpoints"}, "model": {"lora_rank": 4, "targets": ["q", "v"]}}
    second = {"run_name": "b", "runs_dir": "other", "trainer": {"default_root_dir": "other/b", "max_steps": 4},
              "checkpoint": {"dirpath": "other/b/checkpoints"}, "model": {"lora_rank": 8, "targets": ["q", "v"],
                                                                          "optimizer": None}}
    diff = config_diff([first, None, second])
    assert diff == [{"key": "model.lora_rank", "values": [4, None, 8], "missing": [1]},
                    {"key": "model.optimizer", "values": [None, None, None], "missing": [0, 1]}]
    assert {"run_name", "runs_dir", "trainer.default_root_dir", "checkpoint.dirpath"} <= set(IGNORED_CONFIG_KEYS)


def test_config_diff_tells_types_and_list_order_apart():
    diff = config_diff([{"a": 1, "b": ["x", "y"], "c": 0.5}, {"a": 1.0, "b": ["y", "x"], "c": 0.5},
                        {"a": True, "b": ["x", "y"], "c": 0.5}])
    assert [d["key"] for d in diff] == ["a", "b"]


def test_labels_are_run_names_then_file_names(tmp_path):
    python = write_run(tmp_path / "runs" / "demo", manifest("demo", 2.0))
    rust = write_run(tmp_path / "runs" / "demo", manifest("demo", 2.5), "MANIFEST_RUST.json")
    anonymous = write_run(tmp_path / "runs" / "old", manifest(None, 3.0))
    loose = write_run(tmp_path / "elsewhere", manifest(None, 3.0), "baseline.json")
    runs = [LoadedRun(str(p), p, json.loads(p.read_text())) for p in (python, rust, anonymous, loose)]
    assert run_labels(runs) == ["demo (MANIFEST.json)", "demo (MANIFEST_RUST.json)", "old", "baseline.json"]
    same_twice = [LoadedRun(str(p), p, json.loads(p.read_text())) for p in (python, python)]
    assert run_labels(same_twice) == [str(python), str(python)]


def test_json_output_with_a_renamed_manifest(tmp_path, capsys):
    base = write_run(tmp_path / "runs" / "py", manifest("py", 2.73, chrf=0.30))
    rust = write_run(tmp_path / "runs" / "rs", manifest("rs", 2.31, chrf=0.35, model={"lora_rank": 16}),
                     "MANIFEST_RUST.json")
    assert main(["compare", str(base.parent), str(rust), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["label"] for r in report["runs"]] == ["py", "rs"] and report["baseline"] == "py"
    assert report["runs"][1]["manifest"] == str(rust)
    rows = metrics_by_name(report)
    assert rows["final_train_loss"]["deltas"][1] == pytest.approx(-0.42)
    assert rows["final_train_loss"]["source"] == "phase_results.phase_4_training.training_stats.final_train_loss"
    assert rows["eval_delta_chrf"]["values"] == pytest.approx([0.1, 0.15])
    assert rows["peak_vram_gb"]["values"] == [None, None]
    keys = {d["key"]: d["values"] for d in report["config_diff"]}
    assert keys == {"model.lora_rank": [8, 16], "model.learning_rate": [0.0002, None]}


def test_nan_loss_is_shown_and_is_null_in_json(tmp_path, capsys):
    a = write_run(tmp_path / "a", manifest("a", 2.0))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "MANIFEST.json").write_text(json.dumps(manifest("b", float("nan"))))
    assert main(["compare", str(a), str(tmp_path / "b")]) == 0
    assert "nan" in capsys.readouterr().out
    assert main(["compare", str(a), str(tmp_path / "b"), "--json"]) == 0
    loss = metrics_by_name(json.loads(capsys.readouterr().out))["final_train_loss"]
    assert loss["values"] == [2.0, None] and loss["deltas"] == [None, None]


@pytest.mark.parametrize(("make_bad", "message"), [
    (lambda tmp: tmp / "missing", "does not exist"),
    (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "is a directory without MANIFEST.json"),
    (lambda tmp: (tmp / "bad.json").write_text("{not json") and tmp / "bad.json", "is not valid JSON"),
    (lambda tmp: (tmp / "list.json").write_text("[1, 2]") and tmp / "list.json", "holds a JSON list"),
])
def test_bad_run_is_one_clear_error_naming_it(tmp_path, capsys, make_bad, message):
    good = write_run(tmp_path / "good", manifest("good", 2.0))
    bad = str(make_bad(tmp_path))
    assert main(["compare", str(good), bad]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"codetune compare: error: RUN {bad!r}") and message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_every_bad_run_is_named_at_once(tmp_path, capsys):
    assert main(["compare", str(tmp_path / "x"), str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert f"RUN {str(tmp_path / 'x')!r} does not exist" in err and f"RUN {str(tmp_path / 'y')!r}" in err


@pytest.mark.parametrize("args", [[], ["runs/only-one"]])
def test_fewer_than_two_runs_is_an_error(args, capsys):
    assert main(["compare", *args]) == 2
    err = capsys.readouterr().err
    assert f"two or more runs to compare (got {len(args)})" in err and "codetune compare runs/a runs/b" in err


def test_compare_never_imports_the_training_stack(tmp_path):
    a = write_run(tmp_path / "a", manifest("a", 2.0))
    b = write_run(tmp_path / "b", manifest("b", 1.5))
    code = ("import sys; from codetune.__main__ import main; "
            f"main(['compare', {str(a)!r}, {str(b)!r}]); "
            "print(sorted(m for m in ('lightning', 'peft', 'bitsandbytes', 'torch') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "(-0.5)" in result.stdout and result.stdout.strip().splitlines()[-1] == "[]"


def test_lightning_cli_entry_forwards_compare(tmp_path, capsys):
    from codetune.__main__ import main as cli_main

    a = write_run(tmp_path / "a", manifest("a", 2.0))
    assert cli_main(["compare", str(a), str(a), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["baseline"] == str(a)


# Where `fit` writes each compared figure in MANIFEST.json's phase_results (spelled out here, not read from
# codetune.commands.compare's rows, so a row reading the wrong place fails).
TRAINED_FIGURES = {
    "final_train_loss": ("phase_4_training", "training_stats", "final_train_loss"),
    "final_val_loss": ("phase_4_training", "training_stats", "final_val_loss"),
    "final_perplexity": ("phase_4_training", "training_stats", "final_perplexity"),
    "optimizer_steps": ("phase_4_training", "training_stats", "optimizer_steps"),
    "tokens_trained": ("phase_4_training", "training_stats", "tokens_trained"),
    "trainable_parameters": ("phase_3_model", "trainable_parameters"),
    "train_windows": ("phase_2_tokenize", "train_windows"),
    "eval_base_perplexity": ("phase_5_evaluation", "base", "perplexity"),
    "eval_final_perplexity": ("phase_5_evaluation", "final", "perplexity"),
}


def figure(manifest_data: dict, path: tuple[str, ...]):
    value = manifest_data["phase_results"]
    for key in path:
        value = value[key]
    return value


@pytest.mark.slow
def test_two_trained_runs_compare_end_to_end(tmp_path, capsys):
    from helpers import write_fixture_repo
    from helpers import fit_args

    from codetune.eval.report import format_change, format_value

    repo = write_fixture_repo(tmp_path / "repo")
    runs = tmp_path / "runs"
    # No generated prompts: the held-out perplexity is the evaluation compared here, at a fraction of the time.
    quick = ["--trainer.max_steps", "4", "--generation.repo_prompts", "0", "--generation.fim_prompts", "0",
             "--generation.prompts", "[]"]
    for name, rank in (("rank4", "4"), ("rank8", "8")):
        assert main(fit_args(repo, runs, name, "--model.lora_rank", rank, *quick)) == 0
    four, eight = (json.loads((runs / name / "MANIFEST.json").read_text()) for name in ("rank4", "rank8"))
    capsys.readouterr()

    assert main(["compare", str(runs / "rank4"), str(runs / "rank8"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["baseline"] == "rank4" and [r["label"] for r in report["runs"]] == ["rank4", "rank8"]
    rows = metrics_by_name(report)
    for name, path in TRAINED_FIGURES.items():
        a, b = figure(four, path), figure(eight, path)
        assert rows[name]["values"] == [a, b] and rows[name]["deltas"] == [None, b - a], name
    # Same data, seed, base and steps: the rank changes the adapter and what it learnt, not what it saw.
    deltas = {name: rows[name]["deltas"][1] for name in TRAINED_FIGURES}
    assert deltas["trainable_parameters"] > 0 and deltas["final_train_loss"] != 0
    assert (deltas["optimizer_steps"], deltas["tokens_trained"], deltas["train_windows"]) == (0, 0, 0)
    assert rows["optimizer_steps"]["values"] == [4, 4] and deltas["eval_base_perplexity"] == 0
    # The one setting that differs, with both runs' values, as each manifest recorded it.
    assert (four["config"]["model"]["lora_rank"], eight["config"]["model"]["lora_rank"]) == (4, 8)
    assert report["config_diff"] == [{"key": "model.lora_rank", "values": [4, 8], "missing": []}]

    assert main(["compare", str(runs / "rank4"), str(runs / "rank8")]) == 0
    cells = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
             for line in capsys.readouterr().out.splitlines() if line.count("│") == 4}
    for name, label in (("final_train_loss", "final train loss"), ("trainable_parameters", "trainable parameters")):
        a, b = rows[name]["values"]
        assert cells[label] == [format_value(a), f"{format_value(b)} ({format_change(b - a)})"], label
    assert cells["model.lora_rank"] == ["4", "8"]


@pytest.mark.parametrize(("value", "rate", "shown"), [
    (-0.006365, False, "-0.006365"), (-0.006365, True, "-0.006"), (0.0630174, True, "0.063"), (1.0, True, "1.000"),
    (2.73, False, "2.73"), (6.0, False, "6"), (2095.89, False, "2,096"), (999.96, False, "1,000"),
    (30.2712, False, "30.27"), (1e-7, False, "0.0000001"), (12_345, False, "12,345"), (None, False, "—"),
])
def test_values_read_without_exponents_and_rates_have_three_decimals(value, rate, shown):
    from codetune.eval.report import format_value

    assert format_value(value, rate=rate) == shown


def test_changes_have_a_sign_and_the_values_precision():
    from codetune.eval.report import format_change

    assert [format_change(c) for c in (-390.6268, 0.0123456, -2066.2, 50, 0.0)] == ["-391", "+0.0123", "-2,066",
                                                                                   "+50", "0"]
    assert [format_change(c, rate=True) for c in (-0.0503895, 0.0, 0.25)] == ["-0.050", "0.000", "+0.250"]


def test_eval_rates_are_shown_with_three_decimals_in_every_column(tmp_path, capsys):
    a = write_run(tmp_path / "a", manifest("a", 2.73, chrf=0.0630174))
    b = write_run(tmp_path / "b", manifest("b", 2.31, chrf=0.0566509))
    assert main(["compare", str(a.parent), str(b.parent)]) == 0
    lines = {line.split("│")[1].strip(): line for line in capsys.readouterr().out.splitlines() if line.count("│") == 4}
    cells = [c.strip() for c in lines["completion chrF, tuned"].split("│")[2:4]]
    assert cells == ["0.063", "0.057 (-0.006)"]
    assert [c.strip() for c in lines["held-out perplexity, base"].split("│")[2:4]] == ["40", "40 (0)"]


def test_fim_metrics_are_compared_as_rates(tmp_path, capsys):
    runs = []
    for name, exact in (("a", 0.25), ("b", 0.375)):
        data = manifest(name, 2.0, chrf=0.3)
        evaluation = data["phase_results"]["phase_5_evaluation"]
        evaluation["base"].update(fim_exact_match=0.125, fim_chrf=0.2, fim_syntax_valid=0.5)
        evaluation["final"].update(fim_exact_match=exact, fim_chrf=0.1, fim_syntax_valid=0.5)
        runs.append(write_run(tmp_path / name, data))
    rows = metrics_by_name(compare_runs(loaded(*(json.loads(r.read_text()) for r in runs))))
    assert rows["eval_final_fim_exact_match"]["verdicts"] == [None, "better"]
    assert rows["eval_final_fim_chrf"]["better"] == rows["eval_final_fim_syntax_valid"]["better"] == "higher"
    assert main(["compare", str(runs[0].parent), str(runs[1].parent)]) == 0
    out = capsys.readouterr().out
    lines = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") == 4}
    assert [c.strip() for c in lines["FIM line exact match, tuned"].split("│")[2:4]] == ["0.250", "0.375 (+0.125)"]
    assert [c.strip() for c in lines["FIM block chrF, base"].split("│")[2:4]] == ["0.200", "0.200 (0.000)"]
    assert "FIM syntax-valid files, tuned" in lines
