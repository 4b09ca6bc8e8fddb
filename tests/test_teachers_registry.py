"""The teacher registry, walked: every registered kind is built tiny and offline, predicts
probabilities of the right shape, pickles, and does what its capability flags declare."""

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiny_teachers
import torch
from PIL import Image

from zmdevice.classes import ClassList
from zmdevice.errors import UserError
from zmdevice.teachers import (
    KIND_MODULES,
    REGISTRY,
    build_teacher,
    list_teachers,
    teacher_class,
    teacher_modality,
)
from zmdevice.teachers.base import Teacher
from zmdevice.teachers.registry import register_teacher

torch.set_num_threads(1)
TOPICS = ClassList(["sports", "politics", "science"], {})
PACKAGE = Path(__file__).resolve().parent.parent / "zmdevice" / "teachers"
SHARED_MODULES = {"__init__", "base", "registry"}
"""The modules of zmdevice/teachers that define no kind."""


@pytest.fixture(scope="module")
def tiny_spec(tmp_path_factory):
    """kind -> the spec of a tiny offline teacher of that kind, each made once."""
    root, made = tmp_path_factory.mktemp("kinds"), {}

    def spec(kind: str) -> str:
        if kind not in made:
            made[kind] = tiny_teachers.tiny_teacher_spec(kind, root, TOPICS.names)
        return made[kind]

    return spec


@pytest.fixture
def onnx_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ZMDEVICE_CACHE", str(tmp_path / "cache"))


def samples(modality: str) -> list:
    if modality == "text":
        return ["the game team", "vote law election"]
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(2)]


def test_the_kind_map_the_registered_classes_and_the_tiny_models_agree():
    modules = {path.stem for path in PACKAGE.glob("*.py")} - SHARED_MODULES
    assert set(KIND_MODULES.values()) == modules, "a kind module missing from KIND_MODULES"
    classes = {kind: teacher_class(kind) for kind in list_teachers()}
    assert set(REGISTRY) == set(KIND_MODULES)
    for kind, cls in classes.items():
        assert REGISTRY[kind] is cls and cls.kind == kind and issubclass(cls, Teacher)
        assert cls.__module__ == f"zmdevice.teachers.{KIND_MODULES[kind]}"
        assert cls.modality in ("text", "image")
    assert set(tiny_teachers.TINY_KINDS) == set(list_teachers()), "give each kind a tiny model"


def test_naming_a_kind_imports_nothing_and_its_modality_only_its_own_module():
    code = (
        "import sys\n"
        "from zmdevice.teachers import list_teachers, resolve_spec, teacher_modality\n"
        "assert resolve_spec('nli:some/model')[0] == 'nli'\n"
        "kinds = [m for m in sys.modules if m.startswith('zmdevice.teachers.')]\n"
        "print(sorted(kinds), 'torch' in sys.modules)\n"
        "assert teacher_modality('nli:some/model') == 'text'\n"
        "kinds = [m for m in sys.modules if m.startswith('zmdevice.teachers.')]\n"
        "heavy = [m for m in ('transformers', 'open_clip', 'timm') if m in sys.modules]\n"
        "print(sorted(kinds), heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, after = out.stdout.strip().splitlines()
    assert before == "['zmdevice.teachers.base', 'zmdevice.teachers.registry'] False"
    assert after == (
        "['zmdevice.teachers.base', 'zmdevice.teachers.nli', 'zmdevice.teachers.registry'] []"
    )


@pytest.mark.parametrize("kind", list_teachers())
def test_every_kind_builds_tiny_offline_predicts_probabilities_and_pickles(kind, tiny_spec):
    spec = tiny_spec(kind)
    teacher = build_teacher(spec, TOPICS)
    cls = teacher_class(kind)
    assert type(teacher) is cls and teacher.kind == kind and teacher.info["kind"] == kind
    assert teacher.modality == cls.modality == teacher_modality(spec)
    assert not teacher.model.training
    assert not any(p.requires_grad for p in teacher.model.parameters())
    items = samples(teacher.modality)
    probs = teacher.predict_items(items)
    assert probs.dtype == torch.float32 and probs.shape == (len(items), len(TOPICS))
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(items)))
    copy = pickle.loads(pickle.dumps(teacher))
    torch.testing.assert_close(copy.predict_items(items), probs)
    assert copy.info == teacher.info and copy.spec == teacher.spec
    worker_part = pickle.dumps((teacher.prepare, teacher.collate))
    assert len(worker_part) < len(pickle.dumps(teacher.model)) / 2


@pytest.mark.parametrize("kind", list_teachers())
def test_has_features_is_honoured(kind, tiny_spec):
    teacher = build_teacher(tiny_spec(kind), TOPICS)
    if not teacher_class(kind).has_features:
        assert teacher.features_and_probs is None
        return
    batch = teacher.collate([teacher.prepare(item) for item in samples(teacher.modality)])
    with torch.inference_mode():
        features, probs = teacher.features_and_probs(batch)
    assert features.ndim == 2 and features.shape[0] == 2 and features.shape[1] > 0
    assert torch.isfinite(features).all()
    torch.testing.assert_close(probs.float().cpu(), teacher.predict_proba(batch))


@pytest.mark.parametrize("runtime", ["onnx", "onnx-int8"])
@pytest.mark.parametrize("kind", list_teachers())
def test_exports_onnx_and_int8_are_honoured(kind, runtime, tiny_spec, onnx_cache):
    cls = teacher_class(kind)
    declared = cls.exports_onnx if runtime == "onnx" else cls.int8
    assert (runtime in cls.runtimes()) == declared
    if not declared:
        with pytest.raises(UserError, match=f"--runtime {runtime}: not for {kind} teachers"):
            build_teacher(tiny_spec(kind), TOPICS, runtime=runtime)
        return
    teacher = build_teacher(tiny_spec(kind), TOPICS, runtime=runtime)
    assert (teacher.info["runtime"], teacher.info["precision"]) == (runtime, "fp32")
    items = samples(teacher.modality)
    probs = teacher.predict_items(items)
    assert probs.shape == (len(items), len(TOPICS))
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(items)))
    if runtime == "onnx":  # the fp32 export labels like PyTorch
        reference = build_teacher(tiny_spec(kind), TOPICS).predict_items(items)
        torch.testing.assert_close(probs, reference, atol=1e-4, rtol=1e-4)


def test_auto_runtime_follows_the_flag(tiny_spec, onnx_cache):
    for kind in list_teachers():
        if kind == "llm":
            continue  # building the tiny LLM adds nothing here: it declares no onnx
        expected = "onnx" if teacher_class(kind).exports_onnx else "torch"
        assert build_teacher(tiny_spec(kind), TOPICS, runtime="auto").info["runtime"] == expected


def test_register_teacher_refuses_a_declaration_its_class_contradicts():
    class Plain(Teacher):
        pass

    class WithFeatures(Teacher):
        def features_and_probs(self, batch):
            return batch, batch

    refusals = [
        (Plain, {"kind": "x-features", "modality": "text", "has_features": True}),
        (WithFeatures, {"kind": "x-no-features", "modality": "text"}),
        (Plain, {"kind": "x-int8", "modality": "text", "int8": True}),
        (Plain, {"kind": "x-audio", "modality": "audio"}),
        (Plain, {"kind": "clip", "modality": "image"}),  # taken
    ]
    teacher_class("clip")
    before = dict(REGISTRY)
    for cls, declaration in refusals:
        kind = declaration.pop("kind")
        with pytest.raises(TypeError, match=f"register_teacher\\('{kind}'\\)"):
            register_teacher(kind, **declaration)(cls)
    assert dict(REGISTRY) == before
    assert Plain.kind == "" and not Plain.has_features
