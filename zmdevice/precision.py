"""Numeric precision and runtime of a model: the one place where ``auto`` is decided.

``--precision auto|fp32|bf16|fp16`` (label and train) picks the dtype that autocast runs a
model's matrix products in; weights, optimizer state, losses, pseudo-labels and exported
ONNX files stay float32 whatever is chosen. ``--runtime auto|torch|onnx`` (label) picks
whether a teacher runs in PyTorch or as an ONNX file in onnxruntime.

``auto`` measures on the machine it runs on (``zmdevice.calibrate``): a labeling run times
the teacher's candidate (runtime, precision) pairs on its first batches and keeps the fastest
that labels like fp32; a training run times a few steps of fp32 and bf16 and keeps bf16 only
when it is faster and its loss stays with fp32's. The decision is cached per model, device,
library versions and CPU, so only the first run measures. Where measuring is impossible or
not worth it (too little data, the ray engine whose workers build their own teacher, shards,
several training processes, a resumed run without a cached decision) ``choose_precision``
and ``choose_runtime`` decide from the table below, written from the machines the project
was measured on; it will be wrong on the next CPU, which is why it is only the fallback.

The table follows what was measured there, not what should be faster in principle:

- CPU, transformers (MiniLM teacher, DistilBERT student): bf16 autocast only on CPUs with
  bf16 instructions (``avx512_bf16`` or ``amx_bf16``). On an EPYC that has them, one
  DistilBERT training step (batch 48 x 48 tokens, forward + backward + AdamW, one thread)
  took 3.7 s in bf16 against 6.5 s in fp32 (1.75x). On an EPYC without them (AVX2 only,
  the machine of ``benchmarks/PERFORMANCE.md``) bf16 is emulated: the MiniLM forward at
  batch 64 was 3.6x slower than fp32, so ``auto`` stays fp32 there.
- CPU, convolutional nets (MobileNetV3 student, EfficientNet teacher): fp32. bf16 made
  mobilenet_v3_small's training step at 32 px 2.6x slower even with bf16 instructions
  (depthwise convolutions and small tensors gain nothing and pay the casts).
- CUDA: bf16 where the GPU supports it (Ampere and newer: same exponent range as fp32, no
  loss scaling needed), else fp16 with a gradient scaler for training.
- MPS: fp32 (nothing measured there).
- Runtime, CPU: a teacher that can be exported (sentence encoders and ImageNet classifiers)
  runs in onnxruntime at fp32, exported once into a cache folder: same probabilities as
  PyTorch within float rounding and at least as fast as PyTorch eager on these CPUs
  (EfficientNet-Lite0 3.7x; MiniLM 1.21x at two threads, 0.99x at one; numbers in
  ``benchmarks/PERFORMANCE.md``). On a CPU with bf16 instructions a text teacher stays in
  PyTorch at bf16: on an EPYC with ``avx512_bf16``, one thread, 2,000 WordNet texts,
  ``zmdevice label --teacher minilm`` ran 277 texts/s end to end in torch bf16 against 176 in
  onnx fp32 (1.58x, 99.9% of labels equal), and the pass alone was 2.85x fp32 eager on
  another such CPU (``benchmarks/PERFORMANCE-avx512-bf16.md``). Elsewhere, and for every
  other teacher, PyTorch.
- ``onnx-int8`` (sentence encoders, only when asked for): the same export with dynamic int8
  matrix products. MiniLM, one thread, 2,000 WordNet texts: 1.52x fp32 eager, but only
  96.4% of labels equal to fp32 (the bar for a default is 99.5%), so ``auto`` never picks it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from zmdevice.errors import UserError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
RUNTIMES = ("auto", "torch", "onnx", "onnx-int8")
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
"""/proc/cpuinfo flags of CPUs that compute bf16 natively (else torch emulates it, slowly)."""


def check_precision(precision: str) -> str:
    """Accept one of PRECISIONS; anything else is a user error naming the flag."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown --precision '{precision}': use one of {', '.join(PRECISIONS)}")
    return precision


def check_runtime(runtime: str) -> str:
    """Accept one of RUNTIMES; anything else is a user error naming the flag."""
    if runtime not in RUNTIMES:
        raise UserError(f"unknown --runtime '{runtime}': use one of {', '.join(RUNTIMES)}")
    return runtime


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """Every instruction flag this CPU reports (empty when unreadable, or not on Linux)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return frozenset()
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return frozenset(flags)


def cpu_bf16_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[str, ...]:
    """The bf16 instruction flags this CPU reports (empty when none, or not on Linux)."""
    flags = cpu_flags(cpuinfo)
    return tuple(flag for flag in CPU_BF16_FLAGS if flag in flags)


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name ("AMD EPYC 9654 96-Core Processor"), else the platform's."""
    import platform

    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass(frozen=True)
class Hardware:
    """What the decision needs to know about a device; ``probe`` fills it in.

    Tests build it by hand to cover machines this one is not (a GPU, a bf16 CPU).
    """

    device_type: str
    """"cpu", "cuda" or "mps"."""
    cpu_bf16: bool = False
    """The CPU has bf16 instructions (``CPU_BF16_FLAGS``)."""
    cuda_bf16: bool = False
    """The GPU computes bf16 (``torch.cuda.is_bf16_supported()``)."""

    @classmethod
    def probe(cls, device) -> Hardware:
        import torch

        device_type = torch.device(device).type
        cuda_bf16 = device_type == "cuda" and bool(torch.cuda.is_bf16_supported())
        return cls(device_type, cpu_bf16=bool(cpu_bf16_flags()), cuda_bf16=cuda_bf16)


@dataclass(frozen=True)
class Precision:
    """A resolved precision: what autocast and the gradient scaler need, and why."""

    name: str
    """"fp32", "bf16" or "fp16"."""
    device_type: str
    reason: str
    """One line for summaries and reports."""

    @property
    def dtype(self):
        import torch

        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.name]

    def autocast(self):
        """Context manager running the model's operations at this precision (fp32: none)."""
        import torch

        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    @property
    def needs_grad_scaler(self) -> bool:
        """fp16's narrow exponent underflows small gradients; bf16 keeps fp32's range."""
        return self.name == "fp16"

    def grad_scaler(self):
        """A ``torch.amp.GradScaler``, enabled only where fp16 needs one."""
        import torch

        return torch.amp.GradScaler(self.device_type, enabled=self.needs_grad_scaler)


def model_family(model) -> str:
    """Whether a model is a "transformer" (more attention layers than convolutions) or a
    "convnet".

    DistilBERT, MiniLM and LMs have only attention layers, a ViT one convolution (its patch
    embedding); MobileNetV3 and EfficientNet have only convolutions, and CLIP's ResNets one
    attention pooling over dozens of convolutions.
    """
    import torch

    attention = convolution = 0
    for module in model.modules():
        attention += "attention" in type(module).__name__.lower()
        convolution += isinstance(module, torch.nn.modules.conv._ConvNd)
    return "transformer" if attention > convolution else "convnet"


def choose_precision(requested: str, hardware: Hardware, family: str) -> Precision:
    """Resolve ``--precision`` for a model of ``family`` on ``hardware`` from the table of
    the module doc: the fallback of ``auto`` where ``zmdevice.calibrate`` cannot measure.

    An explicit choice is honoured (the reason then warns when it is known to be slow);
    fp16 on a CPU is refused: torch has few fp16 CPU kernels and nothing here measured it.
    """
    check_precision(requested)
    kind = hardware.device_type
    if requested != "auto":
        if requested == "fp16" and kind == "cpu":
            raise UserError("--precision fp16 is for GPUs; on a CPU use bf16 (or auto, or fp32)")
        reason = "asked for"
        if requested == "bf16" and kind == "cpu" and not hardware.cpu_bf16:
            reason += " (this CPU has no bf16 instructions: expect it to be slower than fp32)"
        return Precision(requested, kind, reason)
    if kind == "cuda":
        if hardware.cuda_bf16:
            return Precision("bf16", kind, "auto: CUDA with bf16 support")
        return Precision("fp16", kind, "auto: CUDA without bf16, fp16 with a gradient scaler")
    if kind == "cpu" and family == "transformer":
        if hardware.cpu_bf16:
            return Precision("bf16", kind, "auto: transformer on a CPU with bf16 instructions")
        return Precision("fp32", kind, "auto: this CPU has no bf16 instructions")
    if kind == "cpu":
        return Precision("fp32", kind, "auto: bf16 is slower for convolutional nets on CPUs")
    return Precision("fp32", kind, f"auto: nothing measured faster than fp32 on {kind}")


def choose_runtime(requested: str, hardware: Hardware, teacher, precision: str) -> str:
    """Resolve ``--runtime`` for a teacher: "torch", "onnx" or "onnx-int8", from the table of
    the module doc (the fallback of ``auto`` where ``zmdevice.calibrate`` cannot measure).

    Args:
        hardware: the device the teacher runs on (its type; a CPU's bf16 instructions).
        teacher: the teacher's class (``zmdevice.teachers.teacher_class(kind)``) or the
            teacher: what it can run in is its ``runtimes()`` (declared where the kind is
            registered, ``zmdevice.teachers.register_teacher``; precision keeps no list).
    """
    check_runtime(requested)
    device_type = hardware.device_type
    runtimes = teacher.runtimes()
    if requested in ("onnx", "onnx-int8"):
        if requested not in runtimes:
            raise UserError(
                f"--runtime {requested}: not for {teacher.kind} teachers (they run in "
                f"{', '.join(runtimes)}); use --runtime torch"
            )
        if device_type != "cpu":
            raise UserError(f"--runtime {requested} runs teachers on the CPU: add --device cpu")
        if precision not in ("auto", "fp32"):
            raise UserError(f"--runtime {requested} runs in fp32: drop --precision {precision}")
        return requested
    if requested == "torch":
        return "torch"
    if precision == "auto" and hardware.cpu_bf16 and teacher.modality == "text":
        return "torch"  # bf16 autocast (choose_precision) beats the fp32 export there
    auto_onnx = "onnx" in runtimes and device_type == "cpu" and precision in ("auto", "fp32")
    return "onnx" if auto_onnx else "torch"


def teacher_precision(requested: str, runtime: str, hardware: Hardware, family: str) -> Precision:
    """The precision a teacher runs at once its runtime is resolved: onnxruntime runs the
    fp32 export (``choose_runtime`` refused any other request); torch follows
    ``choose_precision``."""
    if runtime == "onnx":
        return Precision("fp32", hardware.device_type, "onnxruntime runs the fp32 export")
    if runtime == "onnx-int8":
        reason = "onnxruntime runs the export with dynamic int8 matrix products"
        return Precision("fp32", hardware.device_type, reason)
    return choose_precision(requested, hardware, family)
