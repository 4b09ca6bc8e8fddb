"""The parts of `zmdevice train` (entry point: ``zmdevice.training.run.run_train``).

``data`` (files -> ``TrainData``), ``stages`` (``StagePlan``: views and losses of a stage),
``loop`` (``Setup``, the state dict, the loop, evaluation) and ``checkpoint`` (the state
dict to safetensors + JSON and back).
"""
