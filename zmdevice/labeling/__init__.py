"""`zmdevice label`: ``run`` (run_label, a row of steps), ``engines`` (the engine chosen
once: ``local_engine`` or ``ray_engine``, sharing ``batches``), ``parts`` (the resumable
parts folder), ``join``, ``shards``, ``sources``, ``gold`` and ``summary``."""
