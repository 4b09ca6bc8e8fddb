"""The student registry, walked: every registered family is built from a catalog preset
with random weights, gives features and logits of the right shapes, and comes back whole
from its saved folder."""

import json

import pytest
import torch

from zmdevice.catalog import list_entries
from zmdevice.errors import UserError
from zmdevice.students import (
    FAMILIES,
    Student,
    build_student,
    load_student,
    register_student,
    save_student,
)

torch.set_num_threads(1)
CLASSES = ["dog", "cat", "bird"]
SMALL = {"image": {"image_size": 32}, "text": {"max_length": 16}}
"""Preprocessing overrides that keep every family's test fast."""


def preset_of(family: str) -> str:
    """A catalog preset of ``family``, a tiny one when there is one."""
    names = sorted(n for n, e in list_entries("student").items() if e.get("family") == family)
    assert names, f"the catalog has no preset of the student family {family}"
    return next((n for n in names if n.startswith("tiny-")), names[0])


def example_inputs(student) -> dict:
    if student.modality == "image":
        size = student.image_size
        generator = torch.Generator().manual_seed(0)
        return {"pixel_values": torch.randn(2, 3, size, size, generator=generator)}
    input_ids, attention_mask = student.encode_texts(["the dog", "a cat is a good animal"])
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def test_every_catalog_student_names_a_registered_family():
    families = {name: e.get("family") for name, e in list_entries("student").items()}
    assert {name: f for name, f in families.items() if f not in FAMILIES} == {}
    for family, cls in FAMILIES.items():
        assert issubclass(cls, Student) and cls.family == family
        assert cls.modality in ("image", "text")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_builds_predicts_and_reloads_from_its_folder(family, tmp_path):
    cls = FAMILIES[family]
    # "preset:" = random initial weights: offline, whatever the preset starts from.
    student = build_student(f"{preset_of(family)}:", CLASSES, preprocess=SMALL[cls.modality])
    assert type(student) is cls and student.family == family and student.training
    assert student.config["architecture"]["family"] == family
    assert student.config["modality"] == cls.modality
    inputs = example_inputs(student)
    student.eval()
    with torch.no_grad():
        features, logits = student.features(**inputs), student(**inputs)
    assert features.shape == (2, student.feature_dim) and logits.shape == (2, len(CLASSES))
    loaded = load_student(save_student(student, tmp_path / family))
    assert type(loaded) is cls and not loaded.training and loaded.classes == CLASSES
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs), logits)


def test_a_saved_student_of_an_unknown_family_is_a_user_error(tmp_path):
    folder = save_student(build_student("tiny-mobilenet", CLASSES), tmp_path / "s")
    config = json.loads((folder / "config.json").read_text())
    config["architecture"]["family"] = "resnet"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="unknown student family 'resnet' for modality 'image'"):
        load_student(folder)


def test_register_student_refuses_a_taken_family_and_a_class_without_modality():
    class NoModality(Student):
        pass

    before = dict(FAMILIES)
    with pytest.raises(TypeError, match="already"):
        register_student("distilbert")(type("Other", (FAMILIES["mobilenet_v3"],), {}))
    with pytest.raises(TypeError, match="no modality"):
        register_student("no-modality")(NoModality)
    assert before == FAMILIES


def test_a_teacher_name_given_as_the_student_and_back_is_named_as_such():
    """The teacher efficientnet-lite0 and the student efficientnet_lite0 differ by one
    character: each swapped name is refused saying which flag takes it."""
    from zmdevice.teachers import resolve_spec

    with pytest.raises(UserError, match=r"a teacher preset: --teacher efficientnet-lite0"):
        build_student("efficientnet-lite0", CLASSES)
    with pytest.raises(UserError, match=r"a student preset: --student efficientnet_lite0"):
        resolve_spec("efficientnet_lite0")
