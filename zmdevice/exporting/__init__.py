"""`zmdevice export`, one module per idea, imported one way (each imports only those above it):
``onnx_file`` (the exported file's metadata contract, saving, ExportError), ``parity`` (the
onnxruntime-vs-PyTorch check), ``graph`` (export_student), ``quantize`` (int8),
``ort_format`` (ONNX Runtime's mobile format), ``hub`` (the Hub folder) and ``run``
(run_export, the steps of the CLI stage)."""
