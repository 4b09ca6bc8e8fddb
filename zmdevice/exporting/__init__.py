"""`zmdevice export`: ``run`` (export_student, the ONNX Runtime parity check, run_export),
``quantize`` (int8) and ``ort_format`` (ONNX Runtime's mobile format)."""
