"""`zmdevice label`: ``run`` (run_label, the local engine), ``ray_engine`` (the same chunks on
a Ray cluster) and ``parts`` (the resumable parts folder both engines write)."""
