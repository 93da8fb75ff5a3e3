"""Does llama.cpp, given the base in GGUF and `codetune export`'s adapter.gguf, compute what peft computes?

    python bench/export_llama_cpp.py RUN --llama-cpp DIR --llama-python PY [--outtype f32 f16 q8_0]

DIR is a llama.cpp checkout (for `convert_hf_to_gguf.py`, which writes the base's GGUF); PY a Python with
`llama_cpp` (llama-cpp-python) installed, which runs llama.cpp itself. Both are the user's to install;
nothing here builds them. For a 'tiny' run the converter is told its tokenizer is GPT-2's byte-level BPE
(`--pre gpt-2`, read as GPT-2's vocabulary): the tiny tokenizer's hash is not in llama.cpp's list, and only
token ids are fed here.

For each `--outtype` it exports RUN, loads base + adapter in llama.cpp, feeds the same token ids as to the
peft model (base + adapter, float32, on the CPU), and prints the largest logit difference, and the share of
positions whose top token agrees, against peft; the base without adapter is compared too, so that a
difference of the conversion is told apart from one of the adapter. The adapter's own effect (tuned minus base
logits) is printed for scale.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONVERT = """
import sys
sys.path.insert(0, {dir!r})
sys.argv = ["convert_hf_to_gguf.py", *{args!r}]
import convert_hf_to_gguf as convert
from conversion.base import TextModel
from conversion.llama import LlamaModel
if {pre!r}:  # a byte-level BPE (GPT-2's) the converter's list does not know: only ids are fed here
    TextModel.get_vocab_base_pre = lambda self, tokenizer: {pre!r}
    LlamaModel.set_vocab = lambda self: self._set_vocab_gpt2()
convert.main()
"""
LLAMA = """
import json, sys
import numpy as np
from llama_cpp import Llama
ids = json.load(open(sys.argv[1]))
kwargs = {"lora_path": sys.argv[3]} if sys.argv[3] != "-" else {}
llm = Llama(model_path=sys.argv[2], n_ctx=len(ids) + 8, logits_all=True, verbose=False, n_threads=2, **kwargs)
llm.eval(ids)
np.save(sys.argv[4], np.asarray(llm.scores[:len(ids)], dtype=np.float32))
"""


def peft_logits(run: Path, ids: list[int], adapter: bool) -> np.ndarray:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run / "base_model", dtype=torch.float32)
    if adapter:
        model = PeftModel.from_pretrained(model, run / "adapter")
    with torch.no_grad():
        return model.eval()(torch.tensor([ids])).logits[0].numpy()


def llama_logits(python: str, base: Path, adapter: Path | None, ids_file: Path, out: Path) -> np.ndarray:
    subprocess.run([python, "-c", LLAMA, str(ids_file), str(base), str(adapter) if adapter else "-", str(out)],
                   check=True)
    return np.load(out)


def compare(got: np.ndarray, want: np.ndarray) -> str:
    agree = float((got.argmax(-1) == want.argmax(-1)).mean())
    return f"max |logit diff| {np.abs(got - want).max():.2e}, top-1 agreement {agree:.3f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--llama-cpp", type=Path, required=True, help="a llama.cpp checkout")
    parser.add_argument("--llama-python", required=True, help="a Python with llama-cpp-python")
    parser.add_argument("--outtype", nargs="+", default=["f32", "f16", "q8_0"])
    parser.add_argument("--pre", default=None, help="tokenizer.ggml.pre to tell the converter (tiny: gpt-2)")
    parser.add_argument("--tokens", type=int, default=256, help="token ids fed to both (from the run's repo)")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    run = args.run.resolve()
    tokenizer = AutoTokenizer.from_pretrained(run / "base_model")
    text = (ROOT / "codetune" / "export" / "gguf.py").read_text()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: args.tokens]
    pre = args.pre or ("gpt-2" if (run / "base_model").is_dir() else None)
    print(f"# llama.cpp vs peft, {datetime.date.today()}, {os.cpu_count()} CPU cores, run {run.name}, "
          f"{len(ids)} tokens\n")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ids_file = tmp / "ids.json"
        ids_file.write_text(json.dumps(ids))
        base_gguf = tmp / "base.gguf"
        subprocess.run([sys.executable, "-c", CONVERT.format(
            dir=str(args.llama_cpp.resolve()), pre=pre,
            args=[str(run / "base_model"), "--outfile", str(base_gguf), "--outtype", "f32"])],
            check=True, capture_output=True)
        base_peft, tuned_peft = peft_logits(run, ids, adapter=False), peft_logits(run, ids, adapter=True)
        print(f"- base GGUF (f32) without adapter vs the HF base: "
              f"{compare(llama_logits(args.llama_python, base_gguf, None, ids_file, tmp / 'b.npy'), base_peft)}")
        print(f"- the adapter's own effect (peft tuned vs base): {compare(tuned_peft, base_peft)}")
        for outtype in args.outtype:
            out = tmp / f"export-{outtype}"
            subprocess.run([sys.executable, "-m", "codetune", "export", str(run), "--to", "gguf", "--outtype",
                            outtype, "--out", str(out)], check=True, capture_output=True, cwd=ROOT)
            got = llama_logits(args.llama_python, base_gguf, out / "adapter.gguf", ids_file, tmp / f"{outtype}.npy")
            print(f"- llama.cpp base + adapter.gguf ({outtype}) vs peft base + adapter: {compare(got, tuned_peft)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
