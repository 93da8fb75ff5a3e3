"""Building the embedded model (`bench/embedded_model.py`): its corpus, tokenizer, pretraining, export and card."""
