"""The parts of `zmdevice train` (entry point: ``zmdevice.training.run.run_train``).

``data`` (files -> ``TrainData``), ``stages`` (``DistillStage``, ``SSLStage``: views and
losses of a stage; ``METHOD_STAGES``), ``loop`` (the frozen ``Setup``, the state dict,
``train_step``, the ``Loop`` and its events), ``evaluation`` and ``checkpoint`` (the state
dict to safetensors + JSON and back); the handlers ``budget``, ``guard`` and ``average``.
"""
