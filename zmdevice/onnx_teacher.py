"""A teacher's network run by onnxruntime: exported once into a cache folder, then reused.

``--runtime onnx`` (on a CPU, a candidate of ``--runtime auto`` for the teachers that
support it, see ``zmdevice.calibrate``) replaces the PyTorch call of a teacher's network
(MiniLM's encoder with its mean pooling, an ImageNet classifier) by an onnxruntime session;
everything around it (tokenising, class weights, the zero-shot head) stays as it is, so the
label loop does not change. The exported file is checked against PyTorch on the example
batch before it is kept: a file that disagrees is never written. ``--runtime onnx-int8``
runs a dynamically quantised copy of that file (sentence encoders), cached beside it.

Cache: ``$ZMDEVICE_CACHE`` or ``~/.cache/zmdevice``, file ``teachers/<key>.onnx``, the key a
hash of the teacher spec, its weight files (names, sizes, modification times) and the
torch / onnxruntime versions, so new weights or a new torch export again. The decisions of
``--runtime auto`` go to the same folder, under ``calibration/`` (``zmdevice.calibrate``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

from zmdevice.errors import UserError, atomic_path

OPSET = 18
PARITY_TOLERANCE = 1e-4
"""Largest |onnxruntime - PyTorch| accepted on the example batch, relative to its scale."""
INT8_MIN_COSINE = 0.95
"""Smallest cosine between an int8 and the fp32 output row accepted on the example batch."""


def cache_root() -> Path:
    """``$ZMDEVICE_CACHE``, else ``$XDG_CACHE_HOME/zmdevice``, else ``~/.cache/zmdevice``."""
    if os.environ.get("ZMDEVICE_CACHE"):
        return Path(os.environ["ZMDEVICE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "zmdevice"


def files_fingerprint(source: Path | None) -> list:
    """(relative name, size, mtime) of a weights file or of every file under a folder."""
    if source is None or not source.exists():
        return []
    files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    root = source.parent if source.is_file() else source
    return [(str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def cache_key(spec: str, weights: Path | None, extra: dict) -> str:
    import onnxruntime
    import torch

    identity = {
        "spec": spec,
        "weights": files_fingerprint(weights),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "opset": OPSET,
        **extra,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


class OnnxModule:
    """Callable like the PyTorch module it was exported from: tensors in, float32 tensor out.

    Runs on the CPU with as many threads as torch uses, so ``--runtime`` compares like for
    like.
    """

    def __init__(self, path: Path, input_names: list[str]):
        import onnxruntime
        import torch

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        try:
            self.session = onnxruntime.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as error:  # onnxruntime raises its own types for a damaged file
            raise UserError(
                f"cannot load the cached teacher {path}: {str(error)[:160]}; delete it to "
                "export again"
            ) from None
        self.path, self.input_names = path, input_names

    def __reduce__(self):
        # An onnxruntime session does not pickle; a copy (a teacher sent to another
        # process) opens the same cached file again.
        return OnnxModule, (self.path, self.input_names)

    def __call__(self, *inputs):
        import torch

        feed = {
            name: value.cpu().numpy() for name, value in zip(self.input_names, inputs, strict=True)
        }
        return torch.from_numpy(self.session.run(None, feed)[0])


def export_path(key: str, int8: bool = False) -> Path:
    """Where the export of the teacher ``key`` (``cache_key``) is cached; ``int8``: its
    quantised copy, beside it."""
    return cache_root() / "teachers" / (f"{key}.int8.onnx" if int8 else f"{key}.onnx")


def onnx_module(
    module, example: tuple, input_names: list[str], dynamic: dict, key: str, int8: bool = False
):
    """``module`` exported to ONNX (or the cached export) as an :class:`OnnxModule`.

    Args:
        module: frozen torch module taking ``example``'s tensors positionally, returning
            one float tensor.
        example: example inputs (a batch > 1 so that the batch axis stays dynamic).
        input_names: one name per input.
        dynamic: input name -> {axis: axis name} of the axes that vary (batch, sequence).
        key: ``cache_key`` of the teacher.
        int8: run a dynamically quantised copy of the export (``--runtime onnx-int8``).

    Raises:
        UserError: the export fails or disagrees with PyTorch on ``example``.
    """
    import torch

    path = export_path(key)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        # The TorchScript exporter traces these feed-forward networks in seconds; the dynamo
        # exporter takes minutes on MiniLM for the same graph.
        with (
            contextlib.redirect_stdout(io.StringIO()),
            warnings.catch_warnings(),
            torch.inference_mode(),
        ):
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(
                    module,
                    example,
                    buffer,
                    dynamo=False,
                    input_names=input_names,
                    output_names=["output"],
                    dynamic_axes={**dynamic, "output": {0: "batch"}},
                    opset_version=OPSET,
                )
            except Exception as error:  # any exporter failure: say so, suggest the way out
                raise UserError(
                    f"cannot export the teacher to ONNX ({' '.join(str(error).split())[:160]})"
                    "; use --runtime torch"
                ) from None
            expected = module(*example).float().numpy()
        with atomic_path(path) as temporary:
            Path(temporary).write_bytes(buffer.getvalue())
            candidate = OnnxModule(Path(temporary), input_names)
            got = candidate(*example).numpy()
            error = float(np.abs(got - expected).max() / max(np.abs(expected).max(), 1e-6))
            if not error <= PARITY_TOLERANCE:
                raise UserError(
                    f"the teacher's ONNX export disagrees with PyTorch (relative error "
                    f"{error:.1e} > {PARITY_TOLERANCE:g}); use --runtime torch"
                )
    if int8:
        return int8_module(path, export_path(key, int8=True), example, input_names)
    return OnnxModule(path, input_names)


def int8_module(fp32_path: Path, path: Path, example: tuple, input_names: list[str]) -> OnnxModule:
    """The cached fp32 export ``fp32_path`` dynamically quantised (int8 weights of every
    MatMul/Gemm, per output channel; activations quantised on the fly), cached as ``path``.

    Before it is kept, each output row on ``example`` must point the way the fp32 export's
    does (cosine >= ``INT8_MIN_COSINE``): a check that the quantiser did not break the graph.
    How often int8 changes a label is measured by ``benchmarks/bench_precision.py``.
    """
    if path.is_file():
        return OnnxModule(path, input_names)
    expected = OnnxModule(fp32_path, input_names)(*example).numpy()
    with atomic_path(path) as temporary, tempfile.TemporaryDirectory(dir=path.parent) as work:
        dynamic_int8(fp32_path, Path(temporary), Path(work))
        got = OnnxModule(Path(temporary), input_names)(*example).numpy()
        cosine = (got * expected).sum(1) / (
            np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1) + 1e-12
        )
        if not cosine.min() >= INT8_MIN_COSINE:
            raise UserError(
                f"the teacher's int8 ONNX export strays from fp32 (cosine {cosine.min():.3f} < "
                f"{INT8_MIN_COSINE}); use --runtime onnx"
            )
    return OnnxModule(path, input_names)


def dynamic_int8(source: Path, target: Path, work: Path) -> None:
    """Write ``target``, a dynamically quantised copy of the transformer ONNX file ``source``:
    per-output-channel int8 weights of MatMul/Gemm and the embedding Gather, activations
    quantised on the fly (``work``: a scratch folder). The student export (``--quantize
    int8``, text) and the ``onnx-int8`` teacher runtime both use it.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = work / "prepared.onnx"
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # onnxruntime's recommended first step (shape inference + graph optimisation).
        # Symbolic shape inference cannot follow a dynamic sequence length; ONNX's own shape
        # inference is enough for dynamic quantisation.
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_dynamic(str(prepared), str(target), weight_type=QuantType.QInt8, per_channel=True)
