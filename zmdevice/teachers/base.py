"""What every teacher kind shares: the :class:`Teacher` interface, how a teacher's network
runs (precision and runtime, :class:`Numerics`), and the zero-shot head."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zmdevice.errors import UserError


class Teacher:
    """A frozen zero-shot classifier. One subclass per kind builds it whole in its
    constructor; every attribute is plain data or a module, so a teacher pickles.

    A teacher owns its preprocessing, split so the heavy part can run in data-loader
    workers: ``prepare(item)`` turns one raw sample (a ``str`` or an RGB ``PIL.Image``) into
    what ``collate(items)`` stacks into a batch, and ``predict_proba(batch)`` returns float32
    [B, C] class probabilities on the CPU. ``prepare`` and ``collate`` are small picklable
    objects of their own, so a worker receives them without the model.

    A kind declares itself with ``registry.register_teacher`` at its class definition, which
    sets the class attributes ``kind``, ``modality``, ``exports_onnx``, ``int8`` and
    ``has_features``: what a kind can do is read from its class, nowhere else.

    Attributes:
        kind: the registry name ("clip", "text-embed", ...).
        modality: "text" or "image".
        exports_onnx: its network is one module call that can run as an ONNX file in
            onnxruntime (``--runtime onnx``).
        int8: that ONNX file also runs with dynamic int8 matrix products
            (``--runtime onnx-int8``).
        has_features: it has a feature space: ``features_and_probs`` is a method.
        spec: resolved ``kind:spec`` string.
        classes: target class names, index = class id.
        prepare: picklable callable, one raw sample -> a prepared item (runs in workers).
        collate: picklable callable, list of prepared items -> a batch.
        info: what the pseudo-label metadata records (kind, preprocessing, prompts,
            precision, runtime, ...).
        stats: running counters a teacher reports (e.g. the LLM's unmapped answers).
        device: the torch device it runs on.
        model: the frozen ``torch.nn.Module`` (eval mode, no gradients).
        precision: the resolved ``zmdevice.precision.Precision`` its network runs at.
        network: the :class:`Network` of the kinds with ``exports_onnx`` (their network is
            one module call, which can also run in onnxruntime); None on the others, which
            run their model under ``precision.autocast()``.
        features_and_probs: batch -> (features [B, D], probabilities [B, C]) from one pass,
            a method of the kinds with ``has_features``; None on the others (callers test
            it). ``zmdevice.fewshot`` adapts such a teacher with a few labeled examples.
    """

    kind: str = ""
    modality: str = ""
    exports_onnx: bool = False
    int8: bool = False
    has_features: bool = False
    features_and_probs = None
    network = None

    @classmethod
    def runtimes(cls) -> tuple[str, ...]:
        """The ``--runtime`` values this kind runs in: torch, then its ONNX ones."""
        return ("torch",) + ("onnx",) * cls.exports_onnx + ("onnx-int8",) * cls.int8

    def __init__(
        self,
        request: Request,
        classes: Sequence[str],
        numerics: Numerics,
        *,
        prepare,
        collate,
        model,
        details: dict,
        stats: dict | None = None,
    ):
        """Called last by a kind's constructor ``(request, classes: ClassList, numerics)``,
        once its model and preprocessing exist.

        Args:
            request: what was asked for.
            classes: the target class names.
            numerics: how the network runs, its precision already resolved.
            prepare, collate, model: see the class attributes.
            details: the kind's own metadata (preprocessing, prompts, class map, ...).
            stats: the kind's counters, updated while it labels.
        """
        entry = request.entry
        self.spec = f"{self.kind}:{request.rest}"
        self.classes = list(classes)
        self.prepare, self.collate, self.model = prepare, collate, model
        self.device = numerics.device
        self.precision = numerics.precision
        self.stats = {} if stats is None else stats
        self.info = {
            "name": request.name or self.spec,
            "kind": self.kind,
            "spec": self.spec,
            "catalog": {k: v for k, v in entry.items() if k != "weights_from"} or None,
            **details,
            **numerics.info(),
        }

    def forward(self, batch) -> Any:
        """batch -> float32 [B, C] probabilities (torch tensor)."""
        raise NotImplementedError

    def with_numerics(self, precision, runtime: str, record: dict | None = None) -> Teacher:
        """A copy of this teacher whose network runs at ``precision`` (a resolved
        ``zmdevice.precision.Precision``) in ``runtime``; model, preprocessing and class
        weights are shared, the counters start at zero. ``record`` goes into its ``info``
        beside the new precision and runtime (how they were chosen).

        Raises:
            UserError: a runtime this kind does not declare (:meth:`runtimes`), or an
                export that fails or disagrees with PyTorch.
        """
        import copy

        if runtime not in self.runtimes():
            raise UserError(f"--runtime {runtime}: not for {self.kind} teachers")
        variant = copy.copy(self)
        variant.precision = precision
        if self.network is not None:
            variant.network = self.network.variant(precision, runtime)
        variant.stats = dict.fromkeys(self.stats, 0)
        variant.info = {
            **self.info,
            "precision": precision.name,
            "precision_reason": precision.reason,
            "runtime": runtime,
            **(record or {}),
        }
        return variant

    def input_lengths(self, texts: Sequence[str]) -> list[int]:
        """Per text, the length a batch pads it to: its tokens where ``collate`` tokenizes
        (every text kind's collate holds its ``tokenizer`` and ``max_length``), else its
        characters. ``labeling.batches.labeling_order`` sorts by it; tokenizing a chunk's
        texts once more costs 1-2% of the teacher's pass on them."""
        tokenizer = getattr(self.collate, "tokenizer", None)
        if tokenizer is None:
            return [len(text) for text in texts]
        encoded = tokenizer(list(texts), truncation=True, max_length=self.collate.max_length)
        return [len(ids) for ids in encoded["input_ids"]]

    def predict_proba(self, batch) -> Any:
        """float32 [B, C] class probabilities (CPU torch tensor) for a collated batch."""
        import torch

        with torch.inference_mode():
            return self.forward(batch).float().cpu()

    def predict_items(self, items: Sequence) -> Any:
        """Convenience: prepare, collate and predict raw samples in this process."""
        return self.predict_proba(self.collate([self.prepare(item) for item in items]))


@dataclass(frozen=True)
class Request:
    """A teacher as asked for, resolved (``zmdevice.teachers.resolve_spec``)."""

    rest: str
    """The spec after ``kind:`` (model, weights, options)."""
    name: str | None = None
    """The teacher as the user named it: a catalog name or ``kind:spec``."""
    entry: dict = field(default_factory=dict)
    """The catalog entry it came from ({} for a ``kind:spec``): preprocessing, maps."""
    templates: str | None = None
    """CLIP prompt templates (``zmdevice.teachers.clip.load_templates``)."""


@dataclass
class Numerics:
    """How a teacher's network runs: precision (autocast) and runtime (torch or onnx).

    A kind routes the network call, and nothing else, through :meth:`network` or its
    ``precision.autocast()``: prompt embeddings, class weights and the zero-shot head stay
    fp32.
    """

    request: str
    """--precision as asked (``auto`` resolved per model by ``set_model``)."""
    runtime: str
    """"torch", "onnx" or "onnx-int8", already resolved."""
    device: Any
    precision: Any = None
    """The resolved ``zmdevice.precision.Precision`` once the model is known."""

    def set_model(self, model) -> None:
        from zmdevice.precision import Hardware, model_family, teacher_precision

        hardware = Hardware.probe(self.device)
        self.precision = teacher_precision(
            self.request, self.runtime, hardware, model_family(model)
        )

    def network(self, module, example: tuple, names: list[str], dynamic: dict, identity):
        """``module`` (tensors in, one float tensor out) as it will run (:class:`Network`).
        ``identity`` = (spec, weights path, dict of whatever else shapes the graph) keys the
        ONNX cache."""
        self.set_model(module)
        export = Export(example, names, dynamic, identity)
        return Network(module, self.precision, self.device, export).variant(
            self.precision, self.runtime
        )

    def info(self) -> dict:
        return {
            "precision": self.precision.name,
            "precision_reason": self.precision.reason,
            "runtime": self.runtime,
        }


@dataclass(frozen=True)
class Export:
    """What exporting a network to ONNX needs (``zmdevice.onnx_teacher.onnx_module``)."""

    example: tuple
    """Example input tensors, a batch > 1 so that the batch axis stays dynamic."""
    names: list
    """One name per input."""
    dynamic: dict
    """Input name -> {axis: axis name} of the axes that vary."""
    identity: tuple
    """(spec, weights path, dict of whatever else shapes the graph): the ONNX cache key."""


class Network:
    """A teacher's network as it runs: the torch module under autocast with a float32
    result, or its cached ONNX export (``zmdevice.onnx_teacher.OnnxModule``).

    Under bf16 or fp16 the module runs with its matrix-product weights stored in that dtype
    (``cast_weights``): autocast would cast them on every call, since a frozen weight is not
    a tensor its cast cache keeps, so the results are the same bit for bit and a batch of
    MiniLM on one core runs 3-6% faster."""

    def __init__(self, module, precision, device, export: Export, onnx=None, runs=None):
        self.module, self.precision, self.device = module, precision, device
        self.export, self.onnx = export, onnx
        self.runs = module if runs is None else runs
        """What runs the batches: ``module``, or its copy with weights cast."""

    def variant(self, precision, runtime: str) -> Network:
        """The same module run at ``precision`` in ``runtime`` ("torch", "onnx" or
        "onnx-int8"; an ONNX runtime exports the module once into the cache folder)."""
        onnx = None
        if runtime == "torch" and precision.name != "fp32":
            runs = cast_weights(self.module, precision.dtype)
            return Network(self.module, precision, self.device, self.export, runs=runs)
        if runtime in ("onnx", "onnx-int8"):
            from zmdevice.onnx_teacher import cache_key, onnx_module

            export = self.export
            onnx = onnx_module(
                self.module,
                export.example,
                export.names,
                export.dynamic,
                cache_key(*export.identity),
                int8=runtime == "onnx-int8",
            )
        return Network(self.module, precision, self.device, self.export, onnx)

    def missing_exports(self, runtime: str) -> list[str]:
        """The ONNX files (``"onnx"``, ``"onnx-int8"``) that running in ``runtime`` would
        export first: an int8 copy is made from the fp32 export."""
        from zmdevice.onnx_teacher import cache_key, export_path

        needs = {"onnx": ["onnx"], "onnx-int8": ["onnx", "onnx-int8"]}.get(runtime, [])
        key = cache_key(*self.export.identity) if needs else None
        return [r for r in needs if not export_path(key, int8=r == "onnx-int8").is_file()]

    def __call__(self, *inputs):
        if self.onnx is not None:
            return self.onnx(*inputs).to(self.device)
        inputs = tuple(x.to(self.device) for x in inputs)
        with self.precision.autocast():
            output = self.runs(*inputs)
        return output.float()


CAST_LAYERS = ("Linear", "Conv1d", "Conv2d", "Conv3d")
"""The ``torch.nn`` layers whose weights autocast casts to bf16 / fp16 for every call."""


def cast_weights(module, dtype):
    """A copy of ``module`` whose ``CAST_LAYERS`` store their weights in ``dtype``; every
    other tensor (embeddings, norms, buffers) is shared with ``module``, not copied, and so
    is a weight that another layer also uses (a tied one keeps fp32 for that layer)."""
    import copy

    import torch

    layers = tuple(getattr(torch.nn, name) for name in CAST_LAYERS)
    own = {}  # parameter id -> whether every module holding it is a cast layer
    for layer in module.modules():
        for tensor in layer.parameters(recurse=False):
            own[id(tensor)] = own.get(id(tensor), True) and isinstance(layer, layers)
    shared = {id(t): t for t in (*module.parameters(), *module.buffers()) if not own.get(id(t))}
    copied = copy.deepcopy(module, dict(shared))  # deepcopy adds to its memo: pass a copy
    for layer in copied.modules():
        if isinstance(layer, layers):
            for name, tensor in list(layer.named_parameters(recurse=False)):
                if id(tensor) not in shared:  # a fresh copy: only cast layers hold it
                    setattr(layer, name, torch.nn.Parameter(tensor.to(dtype), requires_grad=False))
    return copied


def freeze(model):
    """``model`` in eval mode with gradients off (a teacher never trains)."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def existing_path(value: str) -> Path | None:
    """``value`` as a local path when it looks like one (exists, or has a separator)."""
    path = Path(value).expanduser()
    if path.exists():
        return path
    if "/" in value and (value.startswith((".", "/", "~")) or value.endswith((".pt", ".pth"))):
        raise UserError(f"teacher weights not found: {value}")
    return None


def load_hf(kind: str, name: str, loader, **kwargs):
    """``loader.from_pretrained(name)`` with a one-line error instead of a hub traceback."""
    path = existing_path(name)
    try:
        return loader.from_pretrained(str(path) if path else name, **kwargs)
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"cannot load the {kind} teacher '{name}': {first[:200]} (give a local model "
            "folder, or a hub id with network access)"
        ) from None


def tokenize(
    tokenizer, texts: list, max_length: int, *, pairs: list | None = None, truncation=True
):
    """A batch of texts (and their second segments, ``pairs``) as padded int64 tensors of at
    most ``max_length`` tokens: what every text teacher's ``collate`` feeds its model."""
    segments = [texts] if pairs is None else [texts, pairs]
    return tokenizer(
        *segments,
        padding=True,
        truncation=truncation,
        max_length=max_length,
        return_tensors="pt",
    )


def identity(item):
    """The ``prepare`` of text teachers: a text goes to ``collate`` as it is."""
    return item


def stack(items):
    """The ``collate`` of image teachers: [3, S, S] tensors -> [B, 3, S, S]."""
    import torch

    return torch.stack(items)


def words(text: str) -> list[str]:
    """Lower-case alphanumeric words of ``text`` (punctuation dropped)."""
    import re

    return re.findall(r"[a-z0-9]+", text.lower())


def class_weights(per_class: list) -> Any:
    """Zero-shot classifier weights [C, D] from per-class prompt embeddings.

    Args:
        per_class: C tensors [P_c, D], each row one prompt's L2-normalised embedding.

    Returns:
        [C, D]: each class's mean prompt embedding, L2-normalised again (CLIP's recipe).
    """
    import torch

    means = torch.stack([embeddings.mean(0) for embeddings in per_class])
    return torch.nn.functional.normalize(means, dim=-1)


def zero_shot_probs(features, weights, scale: float):
    """softmax(scale * cosine): features [B, D] and weights [C, D] L2-normalised -> [B, C]."""
    return (scale * features @ weights.T).softmax(dim=-1)
