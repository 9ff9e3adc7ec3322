"""Checkpoints through DeepSpeed: one component the training loop calls.

``checkpointer.Checkpointer`` is the way in: it owns the run folder (lock, the run's
record), saves (synchronous or in the background), retention and resume. The modules
below it each do one job:

* ``layout``: where a checkpoint lives (``step_XXXXXXXX/``, ``latest``) and keep-last-N;
* ``files``: atomic folders, sha256 tables in ``meta.json`` and their verification;
* ``choose``: which checkpoint a resume takes, and whether this run may load it;
* ``engine_io``: the DeepSpeed save and load of one tag, RNG and per-rank states;
* ``shared_load``: what each rank reads at resume (its share, checked, kept for the load);
* ``staging``: the device-to-host copy and the background writer of an async save;
* ``mirror``: the copy of each finished checkpoint to an fsspec URL (``s3://``);
* ``universal``: DeepSpeed's universal checkpoint for another world size or ZeRO stage;
* ``run_folder``: the run-folder lock, ``config.yaml`` and metric rows a resume supersedes.

Layout of ``RUN_DIR/checkpoints``::

    step_00000100/            one DeepSpeed tag (model, optimizer and scheduler shards)
        meta.json             step, world size, ZeRO stage, config, size + sha256 of every file
        rank_00000_state.pt   rank r's RNG streams and data position (one small file per rank)
    .step_00000200.tmp/       a save in progress (renamed to step_00000200/ when whole)
    latest                    the tag to resume from; moves only after the rename
"""
