"""What many test modules share: fixture repositories, fit commands and their environment, comparisons of
adapters. Fixtures live in conftest.py; callbacks that subprocesses load by class path live in probes.py."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file

# The training stack: the commands that need no model must start without importing any of it.
HEAVY = ("torch", "lightning", "transformers", "peft", "bitsandbytes")


RUST_FILE = textwrap.dedent('''\
    use std::collections::HashMap;

    #[derive(Debug, Clone, PartialEq)]
    pub struct Counter {
        counts: HashMap<String, usize>,
    }

    impl Counter {
        pub fn new() -> Self {
            Self { counts: HashMap::new() }
        }

        pub fn add(&mut self, word: &str) -> usize {
            let entry = self.counts.entry(word.to_string()).or_insert(0);
            *entry += 1;
            *entry
        }

        pub fn get(&self, word: &str) -> Option<usize> {
            self.counts.get(word).copied()
        }
    }
    ''')


PY_FILE = textwrap.dedent('''\
    import math


    def analyze_energy(values):
        """Return the total and the mean of the values."""
        total = sum(values)
        return total, total / max(len(values), 1)


    class Energy:
        def __init__(self, joules):
            self.joules = joules

        def kilojoules(self):
            return self.joules / 1000.0

        def log_scale(self):
            return math.log10(self.joules)
    ''')


def write_fixture_repo(root: Path, n_copies: int = 6) -> Path:
    """A small mixed repository: Rust and Python sources in nested dirs, a .gitignore, build output
    and a binary file that must be skipped."""
    (root / "src" / "nested").mkdir(parents=True)
    (root / "py" / "pkg").mkdir(parents=True)
    for i in range(n_copies):
        # Distinct contents (duplicates are skipped), same style.
        (root / "src" / f"counter_{i}.rs").write_text(RUST_FILE.replace("Counter", f"Counter{i}"))
        (root / "py" / "pkg" / f"energy_{i}.py").write_text(PY_FILE.replace("Energy", f"Energy{i}"))
    (root / "src" / "nested" / "lib.rs").write_text("pub mod counter;\npub fn answer() -> u32 {\n    42\n}\n")
    (root / ".gitignore").write_text("ignored_dir/\n*.log\n")
    (root / "ignored_dir").mkdir()
    (root / "ignored_dir" / "secret_plan.py").write_text("print('must not be trained on')\n")
    (root / "debug.log").write_text("log line\n")
    (root / "target" / "debug").mkdir(parents=True)
    (root / "target" / "debug" / "build.rs").write_text("fn built() {}\n")
    (root / "blob.py").write_bytes(b"\x00\x01\x02binary\x00" * 10)
    return root


ROOT = Path(__file__).resolve().parents[1]


# The default config plus the tests' preset (tests/tiny.yaml: the random 'tiny' model on CPU, small windows).
TINY_PRESET = str(ROOT / "tests" / "tiny.yaml")
TINY_CONFIGS = ["--config", str(ROOT / "configs" / "training_config.yaml"), "--config", TINY_PRESET]


def fit_command(repo: Path, runs: Path, name: str, *extra: str) -> list[str]:
    """`python -m codetune fit` on the tests' preset, sized for tests (windows of 64, batches of 2 x 2)."""
    import sys

    return [sys.executable, "-m", "codetune", "fit", *TINY_CONFIGS, "--data.repo", str(repo),
            "--data.cache_dir", str(runs.parent / "token-cache"), "--runs_dir", str(runs), "--run_name", name,
            "--data.seq_len", "64", "--data.batch_size", "2", "--data.gradient_accumulation_steps", "2",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--generation.max_new_tokens", "4", "--generation.repo_prompts", "2", *extra]


def train_fixture_run(tmp: Path, name: str, *extra: str) -> Path:
    """A tiny run trained in this process on the fixture repository (test_cli's fit_args); its directory."""
    import contextlib
    import io

    from helpers import fit_args

    from codetune.__main__ import main

    repo = write_fixture_repo(tmp / "repo")
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(fit_args(repo, tmp / "runs", name, *extra)) == 0
    return tmp / "runs" / name


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a training subprocess: offline, with tests/ importable (probe callbacks)."""
    import os

    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            **extra}


@contextlib.contextmanager
def emulated_card(capability: tuple[int, int]):
    """codetune's attention sees a CUDA card of `capability` and takes that card's kernel layout (e.g. k/v repeated
    for the memory-efficient kernel below 8.0); CPU SDPA runs the call, since the CPU has no such kernel to restrict
    to, so the kernel request is dropped."""
    from unittest import mock

    import codetune.model.attention as attention_lib

    with mock.patch.object(attention_lib, "device_capability", lambda device: capability), \
            mock.patch.object(attention_lib, "sdpa_kernel", lambda backends: contextlib.nullcontext()):
        yield


def load_gpu_check(name: str = "gpu_check"):
    """bench/gpu_check.py as a module (it is a script, not part of the package), loaded once; or, by `name`, one of
    the modules of its package bench/gpucheck/ (e.g. "gpucheck.budget"), importable once the script has put
    bench/ on sys.path."""
    import importlib
    import importlib.util
    import sys

    if "gpu_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_check"] = module
        spec.loader.exec_module(module)
    return importlib.import_module(name)


DEFAULT = str(ROOT / "configs" / "training_config.yaml")


def fit_args(repo: Path, runs: Path, name: str, *extra: str) -> list[str]:
    return ["fit", "--config", DEFAULT, "--config", TINY_PRESET, "--data.repo", str(repo), "--runs_dir", str(runs),
            "--data.cache_dir", str(runs.parent / "token-cache"),
            "--run_name", name, "--data.seq_len", "64", "--data.batch_size", "2",
            "--data.gradient_accumulation_steps", "2", "--generation.max_new_tokens", "8",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.max_epochs", "100", *extra]


def assert_same_adapter(run_dir: Path, reference_dir: Path) -> dict[str, torch.Tensor]:
    """The run's exported adapter equals the reference run's, tensor by tensor (CPU, fp32); returns it."""
    reference = load_file(reference_dir / "adapter" / "adapter_model.safetensors")
    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert adapter.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(adapter[key], value, rtol=1e-5, atol=1e-6, msg=key)
    return adapter


def imported_by(*argv: str) -> list[str]:
    """The heavy modules `codetune ARGV` imported, in a fresh interpreter (SystemExit from --help is fine)."""
    code = ("import json, sys\nfrom codetune.__main__ import main\ntry:\n    main(sys.argv[1:])\n"
            "except SystemExit:\n    pass\n"
            f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)), file=sys.stderr)")
    # This checkout's code, even where the editable install points at another one.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env,
                            timeout=120, cwd=ROOT)
    return json.loads(result.stderr.strip().splitlines()[-1])
