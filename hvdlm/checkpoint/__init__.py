"""Checkpoints: their files, their store in a run directory, and how a save is cut and put together.

- format: what one rank's file holds, written atomically and read as data only;
- store: the checkpoints of a run directory (names, the newest complete one, pruning);
- reshard: merging TP shards into one state and cutting it to any TP size;
- stages: pipeline stages' states joined into one and cut apart again;
- manifest: every file's sha256 in a manifest written last, and the files checked against it;
- verify: `hvdlm checkpoint verify`, every save of a run (or one checkpoint) against its manifest;
- slices: ZeRO's optimizer-state slice files and their assembly;
- async_writer: a save's host copy written by a thread of its own while training goes on (train.async_checkpoint);
- manager: the checkpoint policy of a training run (when to save, what each save holds, how it is put back);
- run: a run's newest intact checkpoint, its model config and tokenizer, as readers load them;
- describe: `hvdlm checkpoint inspect`, read from the files without building a model;
- hf: models in and out of Hugging Face transformers, and weights as safetensors;
- hf_llama: the llama arch's names and config.json in transformers (LlamaForCausalLM).
"""
