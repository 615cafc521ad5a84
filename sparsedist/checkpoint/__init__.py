"""Checkpoints: every on-disk format of a run's state, written atomically, resumable at any world size.

checkpointer.py   step folders: save, resume, keep; `load_state` reads either format
dcp.py            torch DCP shards (one process, FSDP2)
pieces.py         per-rank flat pieces with offsets (DeepSpeed ZeRO)
manifest.py       size and SHA-256 of every file, verified before a load
publish.py        stage a folder, then publish it atomically (also corpus, export, teacher cache)

The package imports nothing itself, so that `publish` stays light for its users (data/).
"""
