"""`zmdevice evaluate` on a trained student folder (PyTorch path)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from zmdevice.cli import app
from zmdevice.data import open_dataset
from zmdevice.errors import UserError
from zmdevice.evaluate import predict_student, run_evaluate_student
from zmdevice.students import build_student, load_student, recalibrate_batchnorm, save_student

CLASSES = ["animal", "food", "tool"]
TEXTS = [
    ("a dog is an animal that barks", "animal"),
    ("red fruit", "food"),
    ("a small tool made of metal used to cut", "tool"),
    ("bread", "food"),
    ("a bird", "animal"),
    ("a cat is a small animal", "animal"),
    ("green water plant food", "food"),
    ("hammer", "tool"),
]


pytestmark = pytest.mark.usefixtures("one_thread")


def spread_out(student):
    """Real BatchNorm statistics and large head weights: varied, non-trivial predictions."""
    generator = torch.Generator().manual_seed(0)
    if student.modality == "image":
        # BatchNorm statistics of image-like inputs, so features vary from image to image
        recalibrate_batchnorm(student, [torch.rand(16, 3, 16, 16, generator=generator) * 2 - 1])
    with torch.no_grad():
        # torchvision starts MobileNetV3's Linear layers at N(0, 0.01): features ~1e-3
        parts = [student.head]
        if student.modality == "image":
            parts.append(student.backbone.classifier)
        for part in parts:
            for module in part.modules():
                if isinstance(module, nn.Linear):
                    module.weight.normal_(0, 2 / module.in_features**0.5, generator=generator)
                    module.bias.zero_()
    return student


@pytest.fixture
def text_student(tmp_path):
    return save_student(spread_out(build_student("tiny-distilbert", CLASSES)), tmp_path / "txt")


@pytest.fixture
def text_table(tmp_path):
    path = tmp_path / "test.csv"
    rows = ["text,label"] + [f'"{text}",{label}' for text, label in TEXTS]
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 256, size=(20, 20, 3), dtype=np.uint8)
            pixels[..., c] = 255  # a class colour, so classes differ
            Image.fromarray(pixels).save(tmp_path / "images" / name / f"{i}.png")
    return tmp_path / "images"


def numpy_report(truth, predicted, num_classes):
    """Accuracy and macro-F1 recomputed from scratch."""
    f1s = []
    for c in range(num_classes):
        tp = np.sum((predicted == c) & (truth == c))
        fp = np.sum((predicted == c) & (truth != c))
        fn = np.sum((predicted != c) & (truth == c))
        if tp + fn == 0:
            continue
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(predicted == truth)), float(np.mean(f1s))


def test_text_evaluation_matches_a_numpy_recomputation(text_student, text_table):
    summary = run_evaluate_student(text_student, text_table, device="cpu")

    student = load_student(text_student)
    with torch.no_grad():
        logits = torch.cat(
            [student(*student.encode_texts([text])) for text, _ in TEXTS]
        )  # one text at a time: no padding at all
    predicted = logits.argmax(dim=1).numpy()
    truth = np.array([CLASSES.index(label) for _, label in TEXTS])
    accuracy, macro_f1 = numpy_report(truth, predicted, len(CLASSES))

    assert len(set(predicted.tolist())) > 1  # a real test: not one class for everything
    assert summary["count"] == len(TEXTS)
    assert summary["accuracy"] == pytest.approx(accuracy)
    assert summary["macro_f1"] == pytest.approx(macro_f1)
    confusion = np.array(summary["confusion"])
    assert confusion.sum() == len(TEXTS)
    assert confusion.sum(axis=1).tolist() == np.bincount(truth, minlength=3).tolist()
    assert confusion.sum(axis=0).tolist() == np.bincount(predicted, minlength=3).tolist()
    assert summary["per_class"]["tool"]["support"] == 2
    assert any("confusion" in line for line in summary["lines"])
    assert summary["lines"][0].startswith(f"txt on {text_table}: accuracy")


def test_predict_student_keeps_dataset_order_whatever_the_batch(text_student, text_table):
    student = load_student(text_student)
    dataset = open_dataset(text_table, modality="text")
    one_by_one = predict_student(student, dataset, batch_size=1)
    batched = predict_student(student, dataset, batch_size=3)
    assert one_by_one.shape == (len(TEXTS), 3)
    np.testing.assert_allclose(one_by_one.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(batched, one_by_one, rtol=1e-4, atol=1e-6)


def test_image_evaluation_uses_the_clean_view(tmp_path, image_folder):
    model_dir = save_student(spread_out(build_student("tiny-mobilenet", CLASSES)), tmp_path / "im")
    summary = run_evaluate_student(model_dir, image_folder, device="cpu")

    student = load_student(model_dir)
    size = student.image_size
    mean = np.array(student.config["preprocess"]["mean"], dtype=np.float32)
    std = np.array(student.config["preprocess"]["std"], dtype=np.float32)
    truth, predicted = [], []
    for c, name in enumerate(CLASSES):
        for path in sorted((image_folder / name).glob("*.png")):
            image = Image.open(path).convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
            array = (np.asarray(image, dtype=np.float32) / 255.0 - mean) / std
            pixels = torch.from_numpy(array.transpose(2, 0, 1).copy())[None]
            with torch.no_grad():
                predicted.append(int(student(pixels).argmax()))
            truth.append(c)
    accuracy, macro_f1 = numpy_report(np.array(truth), np.array(predicted), len(CLASSES))
    assert len(set(predicted)) > 1
    assert summary["count"] == 9
    assert summary["accuracy"] == pytest.approx(accuracy)
    assert summary["macro_f1"] == pytest.approx(macro_f1)


def test_labels_outside_the_students_classes_are_a_user_error(text_student, tmp_path):
    table = tmp_path / "other.csv"
    table.write_text("text,label\na dog,animal\na car,vehicle\na boat,ship\n")
    with pytest.raises(
        UserError,
        match=r"unknown label 'vehicle' at row 2 .*\(other unknown labels: ship\); the "
        r"classes of the student .* are: ",
    ):
        run_evaluate_student(text_student, table, device="cpu")


def test_data_of_the_wrong_modality_is_a_user_error(text_student, image_folder):
    with pytest.raises(UserError, match="text data must be a CSV, JSONL or Parquet table"):
        run_evaluate_student(text_student, image_folder, device="cpu")


def test_unlabeled_data_is_a_user_error(text_student, tmp_path):
    table = tmp_path / "unlabeled.csv"
    table.write_text("text\na dog\nbread\n")
    with pytest.raises(UserError, match="label"):
        run_evaluate_student(text_student, table, device="cpu")


def test_cli_evaluate_prints_json_and_one_line_errors(text_student, text_table, tmp_path):
    runner = CliRunner()
    result = runner.invoke(
        app, ["evaluate", str(text_student), "--data", str(text_table), "--device", "cpu", "--json"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["count"] == len(TEXTS) and 0.0 <= summary["accuracy"] <= 1.0

    result = runner.invoke(app, ["evaluate", str(tmp_path), "--data", str(text_table)])
    assert result.exit_code == 2
    assert f"{tmp_path} is not a trained student" in result.output
    assert "Traceback" not in result.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_evaluation_on_cuda_equals_cpu(text_student, text_table):
    on_cpu = run_evaluate_student(text_student, text_table, device="cpu")
    on_gpu = run_evaluate_student(text_student, text_table, device="cuda")
    assert on_gpu["device"].startswith("cuda")
    assert on_gpu["confusion"] == on_cpu["confusion"]
