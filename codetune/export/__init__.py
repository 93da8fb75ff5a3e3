"""A finished run's LoRA adapter, written for the servers that load one, by target: `adapter` reads peft's
adapter and says what a reader cannot load, `base` finds the base without downloading it, `gguf` writes
llama.cpp's GGUF adapter, `ollama` its Modelfile, `vllm` the checked peft adapter, and `record` what an export
wrote, for the marker and the run's manifest. `codetune.commands.export` is the command that runs them.
"""
