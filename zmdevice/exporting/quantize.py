"""The int8 variant of an exported model: ``NAME.onnx`` -> ``NAME.int8.onnx``, same metadata
plus ``zmdevice.quantization``. Dynamic quantisation for the transformer, static QDQ with
calibration images for the CNN."""

from __future__ import annotations

import contextlib
import io
import shutil
import warnings
from pathlib import Path

from zmdevice.errors import UserError
from zmdevice.exporting.onnx_file import save_model, write_metadata
from zmdevice.onnx_teacher import dynamic_int8

INT8_SUFFIX = ".int8.onnx"


def int8_path(fp32_path: Path) -> Path:
    """``export/NAME.onnx`` -> ``export/NAME.int8.onnx``."""
    return fp32_path.with_name(fp32_path.stem + INT8_SUFFIX)


def quantize_int8(
    fp32_path: str | Path, out_path: str | Path, calibration_images: list | None = None
) -> dict:
    """Write an int8 copy of an exported model, with the same zmdevice metadata.

    Text (transformer): dynamic quantisation, per-channel int8 weights of MatMul/Gemm and
    of the embedding Gather, activations quantised on the fly. Images (CNN): static QDQ with
    per-channel int8 weights and uint8 activations whose ranges are calibrated on
    ``calibration_images`` (clean training images), after onnxruntime's pre-processing
    (shape inference and graph optimisation).

    Returns:
        ``{"path", "method", "size_bytes", "calibration_images"}``.
    """
    import onnx

    from zmdevice.runtime import OnnxClassifier

    fp32_path, out_path = Path(fp32_path), Path(out_path)
    classifier = OnnxClassifier(fp32_path)
    original = onnx.load(str(fp32_path))
    metadata = {p.key: p.value for p in original.metadata_props if p.key.startswith("zmdevice.")}
    work = out_path.parent / f".{out_path.name}.work"
    work.mkdir(parents=True, exist_ok=True)
    try:
        quantized = work / "model.int8.onnx"
        if classifier.modality == "image" and not calibration_images:
            raise UserError(
                "static int8 quantisation needs calibration images: pass --calibration DIR "
                "(a folder of typical images)"
            )
        if classifier.modality == "text":
            # Per-channel weight scales: on the WordNet test set per-tensor int8 lost 1.5
            # points of accuracy against fp32, per-channel 0.25 (top class agreed on 98%).
            method = "dynamic int8 (per-channel MatMul/Gemm/Gather weights)"
            dynamic_int8(fp32_path, quantized, work)
        else:
            method = _static_qdq(classifier, fp32_path, quantized, calibration_images)
        model = onnx.load(str(quantized))
        metadata["zmdevice.quantization"] = method
        write_metadata(model, metadata)
        size = save_model(model, out_path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "path": str(out_path),
        "method": method,
        "size_bytes": size,
        "calibration_images": len(calibration_images or []),
    }


def _static_qdq(classifier, fp32_path: Path, quantized: Path, images: list) -> str:
    """Static QDQ int8 of an image model into ``quantized`` (beside it, a prepared copy);
    returns the method's description."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # onnxruntime's recommended first step: shape inference + graph optimisation, so the
    # quantiser sees fused Conv nodes with known shapes.
    prepared = quantized.parent / "model.pre.onnx"
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quant_pre_process(str(fp32_path), str(prepared))
    quantize_static(
        str(prepared),
        str(quantized),
        _calibration_reader(classifier, images),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    return f"static QDQ int8 (per-channel, {len(images)} calibration images)"


def _calibration_reader(classifier, images: list, batch_size: int = 16):
    """An onnxruntime CalibrationDataReader over preprocessed image batches."""
    from onnxruntime.quantization import CalibrationDataReader

    class ImageBatches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(
                classifier.encode_images(images[start : start + batch_size])
                for start in range(0, len(images), batch_size)
            )

        def get_next(self):
            return next(self.batches, None)

    return ImageBatches()
