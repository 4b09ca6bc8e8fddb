"""The labeling loop: which samples to label next (`zmdevice suggest`, ``suggest``), which
labels look wrong (`zmdevice check`, ``check``), the FM feature space both read
(``fm_space``), Label Studio's task and export formats (``label_studio``) and the two
commands' settings (``settings``, light enough for the CLI to import)."""
