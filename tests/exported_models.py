"""Tiny trained students, their data and their ONNX exports, shared by the export tests.

An untrained MobileNet outputs logits near 1e-11 (docs/measured.md), which makes parity and
accuracy checks meaningless, so each tiny student is trained for a few dozen steps on a
synthetic task it can learn (images: the dominant colour; text: animal vs plant words).
Built once per test session (``build(root)`` caches by folder) and reused by
test_export.py, test_runtime.py and test_web.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

IMAGE_CLASSES = ["red", "green", "blue"]
TEXT_CLASSES = ["animal", "plant"]
ANIMAL_WORDS = ["dog", "cat", "bird", "fish", "animal"]
PLANT_WORDS = ["tree", "flower", "fruit", "plant", "bread"]
_CACHE: dict[Path, dict] = {}


def colour_image(class_index: int, rng: np.random.Generator, size: int = 16):
    """An RGB PIL image whose dominant channel is ``class_index``, with noise."""
    from PIL import Image

    pixels = rng.integers(0, 110, size=(size, size, 3))
    pixels[:, :, class_index] += 120 + rng.integers(0, 25)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def write_image_folder(folder: Path, per_class: int, seed: int) -> Path:
    """A labeled image folder (one sub-folder per class); a few images are not 16x16."""
    rng = np.random.default_rng(seed)
    for index, name in enumerate(IMAGE_CLASSES):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            size = 16 if i % 4 else 23
            colour_image(index, rng, size).save(folder / name / f"{i:03d}.png")
    return folder


def texts_for(label: int, rng: np.random.Generator, count: int) -> list[str]:
    words = ANIMAL_WORDS if label == 0 else PLANT_WORDS
    fillers = ["the", "a", "small", "red", "good", "of", "with"]
    out = []
    for _ in range(count):
        n = int(rng.integers(1, 12))
        chosen = [str(rng.choice(words)) if rng.random() < 0.5 else str(rng.choice(fillers))]
        chosen += [str(rng.choice(fillers + words)) for _ in range(n)]
        chosen.append(str(rng.choice(words)))
        out.append(" ".join(chosen))
    return out


def write_text_table(path: Path, per_class: int, seed: int) -> Path:
    """A labeled CSV (text,label)."""
    import csv

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for label, name in enumerate(TEXT_CLASSES):
            for text in texts_for(label, rng, per_class):
                writer.writerow([text, name])
    return path


def _train_image_student(data: Path, steps: int = 60):
    import torch

    from zmdevice.augment import image_transforms
    from zmdevice.data import open_dataset
    from zmdevice.students import build_student

    torch.manual_seed(0)
    student = build_student("tiny-cnn", IMAGE_CLASSES, seed=0)
    pre = student.config["preprocess"]
    clean = image_transforms(pre["image_size"], pre["mean"], pre["std"])["clean"]
    dataset = open_dataset(data, require_labels=True)
    x = torch.stack([clean(dataset.load_image(i)) for i in range(len(dataset))])
    y = torch.tensor([IMAGE_CLASSES.index(label) for label in dataset.labels])
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    student.train()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(student(pixel_values=x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return student.eval()


def _train_text_student(table: Path, steps: int = 40):
    import torch

    from zmdevice.data import open_dataset
    from zmdevice.students import build_student

    torch.manual_seed(0)
    student = build_student("tiny-distilbert", TEXT_CLASSES, seed=0)
    dataset = open_dataset(table, require_labels=True)
    ids, mask = student.encode_texts(dataset.texts)
    y = torch.tensor([TEXT_CLASSES.index(label) for label in dataset.labels])
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)
    student.train()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(student(input_ids=ids, attention_mask=mask), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return student.eval()


def _write_train_config(model_dir: Path, unlabeled: Path) -> None:
    # The fields zmdevice.export reads from training/run.py's file: where the training data is.
    (model_dir / "train_config.toml").write_text(
        f"unlabeled = {json.dumps(str(unlabeled))}\nlabeled = {json.dumps(str(unlabeled))}\n",
        encoding="utf-8",
    )


def model_file(paths: dict, name: str) -> Path:
    """``image_onnx``/``text_onnx`` or their int8 twins ``image_int8``/``text_int8``."""
    from zmdevice.exporting.quantize import int8_path

    if name.endswith("_int8"):
        return int8_path(Path(paths[name.replace("_int8", "_onnx")]))
    return Path(paths[name])


def predict_json(model: Path, inputs: list[str], top_k: int) -> dict:
    """What `zmdevice predict MODEL INPUT... --top-k K --json` prints, decoded."""
    from typer.testing import CliRunner

    from zmdevice.cli import app

    arguments = ["predict", str(model), *inputs, "--top-k", str(top_k), "--json"]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output[-2000:]
    return json.loads(result.stdout)


def build(root: Path) -> dict:
    """Train, save and export the tiny students under ``root`` (once per root).

    Returns:
        paths: image_train, image_test, text_train, text_test, image_dir, text_dir (student
        folders), image_onnx, text_onnx, plus the summaries image_export/text_export.
    """
    root = Path(root)
    if root in _CACHE:
        return _CACHE[root]
    import torch

    from zmdevice.config import ExportConfig
    from zmdevice.exporting.run import run_export
    from zmdevice.students import save_student

    torch.set_num_threads(1)
    paths: dict = {}
    paths["image_train"] = write_image_folder(root / "data" / "img-train", 12, seed=1)
    paths["image_test"] = write_image_folder(root / "data" / "img-test", 5, seed=2)
    paths["text_train"] = write_text_table(root / "data" / "text-train.csv", 24, seed=1)
    paths["text_test"] = write_text_table(root / "data" / "text-test.csv", 10, seed=2)

    image_student = _train_image_student(paths["image_train"])
    paths["image_dir"] = save_student(image_student, root / "models" / "tiny-img")
    _write_train_config(paths["image_dir"], paths["image_train"])
    text_student = _train_text_student(paths["text_train"])
    paths["text_dir"] = save_student(text_student, root / "models" / "tiny-txt")
    _write_train_config(paths["text_dir"], paths["text_train"])

    paths["image_onnx"] = root / "export" / "tiny-img.onnx"
    paths["text_onnx"] = root / "export" / "tiny-txt.onnx"
    paths["image_export"] = run_export(
        ExportConfig(model_dir=paths["image_dir"], out=paths["image_onnx"], quantize="int8")
    )
    paths["text_export"] = run_export(
        ExportConfig(model_dir=paths["text_dir"], out=paths["text_onnx"], quantize="int8")
    )
    _CACHE[root] = paths
    return paths
