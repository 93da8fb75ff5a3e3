"""The TensorBoard layout of a run: no `epoch` panel, the base eval as step 0 of the eval curves, and one
sample tag per prompt whose steps are the evals."""

from __future__ import annotations

import contextlib

import lightning as L
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from codetune.callbacks.generation_eval import Completion, GenerationEval
from codetune.run.tensorboard import EpochlessTensorBoardLogger
from helpers import PY_FILE, RUST_FILE


class _Adapter(torch.nn.Module):
    def disable_adapter(self):
        return contextlib.nullcontext()


class _Module(L.LightningModule):
    """A linear model that logs its loss through `self.log` (where Lightning adds `epoch`), with what the
    generation eval reads of codetune's module; generation itself is faked below."""

    def __init__(self) -> None:
        from codetune.data.tokenizer import train_tokenizer

        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.model = _Adapter()
        self.tokenizer = train_tokenizer([RUST_FILE, PY_FILE], vocab_size=400)  # the prompts are cut where it cuts

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch).pow(2).mean()
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def held_out_loss(self) -> float:
        return 3.0

    def check_finite_base(self, nll: float) -> None:
        assert nll == 3.0


class _Data(L.LightningDataModule):
    val_sources = [("src/counter.rs", "rust", RUST_FILE), ("py/energy.py", "python", PY_FILE)]
    fim_tokens = None  # a tokenizer without FIM sentinels: no FIM prompts
    seq_len = 4096  # windows long enough that the prompts' context is bounded by the eval's own limits

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(4, 2), batch_size=2)


def test_eval_curves_start_at_the_base_and_each_prompt_has_one_tag(tmp_path):
    # A seed whose two prompts, in path order, do not have their truths in length order.
    evaluation = GenerationEval(prompts=["fn process"], repo_prompts=2, seed=9)
    evaluation._generate_batch = lambda module, requests: [Completion(f"\n    x{i}\n", 3, False)
                                                           for i, _ in enumerate(requests)]
    logger = EpochlessTensorBoardLogger(str(tmp_path), name="tensorboard", version="", default_hp_metric=False)
    trainer = L.Trainer(max_epochs=3, logger=logger, callbacks=[evaluation], accelerator="cpu",
                        log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(_Module(), datamodule=_Data())
    # Shortest truth first, so that the rows of a batch stop at similar steps.
    truth_lines = [len(p.continuation.splitlines()) for p in evaluation._repo_prompts]
    assert truth_lines == sorted(truth_lines) and len(set(truth_lines)) > 1
    assert [p.path for p in evaluation._repo_prompts] == ["src/counter.rs", "py/energy.py"]

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert "epoch" not in scalars and "train/loss" in scalars
    assert not any(tag.endswith("_base") for tag in scalars)
    # 2 steps an epoch: the base at step 0, then the tuned evals at the end of each epoch, on one curve.
    assert [e.step for e in events.Scalars("eval/chrf")] == [0, 2, 4, 6]
    assert [e.step for e in events.Scalars("train/loss")] == [0, 1, 2, 3, 4, 5]
    samples = sorted(t for t in events.Tags()["tensors"] if t.startswith("samples/"))
    # Event files name a text tag `<tag>/text_summary`; TensorBoard shows it as `<tag>`.
    assert samples == [f"samples/{name}/text_summary" for name in ("language_00", "repo_00", "repo_01")]
    assert all([e.step for e in events.Tensors(tag)] == [0, 2, 4, 6] for tag in samples)


def test_only_the_epoch_key_is_dropped(tmp_path):
    logger = EpochlessTensorBoardLogger(str(tmp_path), name="tb", version="")
    logger.log_metrics({"epoch": 3, "train/loss": 1.5, "epochs_seen": 2}, step=7)
    logger.save()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["epochs_seen", "train/loss"]
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(7, 1.5)]
