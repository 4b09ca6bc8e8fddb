"""The wheel carries the whole product: code, catalog, class maps and the default data.

Built from a copy of the repository (so a trained student lying in ``models/NAME/`` can be
planted to check that it stays out), installed into a separate venv and used from an
empty folder, where the catalog and the data can only come from the wheel. ``.ci/run``
then runs ``zmdevice demo --quick`` from such an install.
"""

import json
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import zmdevice

# Building copies and packs the 2,500 files of the real default data: a minute or more.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SKIPPED = ("build", "*.egg-info", ".git", ".venv", "node_modules", "__pycache__", "labels", "data")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("source") / "zmdevice"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*SKIPPED), symlinks=True)
    for folder in ("models", "export", "demo-run"):
        for trained in (source / folder).glob("*/student.safetensors"):
            shutil.rmtree(trained.parent)  # a developer's own runs
    planted = source / "models" / "my-student"
    planted.mkdir()
    (planted / "student.safetensors").write_bytes(b"not for the wheel")
    (planted / "config.json").write_text("{}")
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(dist), str(source)],
        check=True, capture_output=True,
    )  # fmt: skip
    (built,) = dist.glob("zmdevice-*.whl")
    return built


def test_wheel_holds_catalog_default_data_and_licence(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    catalog = {path.name for path in (ROOT / "models").glob("*.to*")}
    catalog |= {path.name for path in (ROOT / "models").glob("*.json")}
    assert {f"zmdevice/_catalog/{name}" for name in catalog} <= names
    assert not any("my-student" in name for name in names)
    shipped = {
        path.relative_to(ROOT / "examples" / "default").as_posix()
        for path in (ROOT / "examples" / "default").rglob("*")
        if path.is_file() and path.suffix in (".png", ".csv", ".toml", ".json", ".md")
    }
    assert len(shipped) > 2000
    assert {f"zmdevice/_default_data/{name}" for name in shipped} <= names
    code = {path.relative_to(ROOT).as_posix() for path in (ROOT / "zmdevice").rglob("*.py")}
    assert {"zmdevice/__main__.py", "zmdevice/teachers/clip.py"} <= code <= names
    metadata = zipfile.ZipFile(wheel).read(f"zmdevice-{zmdevice.__version__}.dist-info/METADATA")
    assert b"License-Expression: Apache-2.0" in metadata
    assert f"zmdevice-{zmdevice.__version__}.dist-info/licenses/LICENSE" in names


def outer_site_dirs() -> list[str]:
    """The site-packages folders of the environment running the tests: a venv's own when
    they run in one (``--system-site-packages`` would give its base interpreter's), else the
    interpreter's; the user's too where this interpreter reads it."""
    folders = site.getsitepackages()
    if site.ENABLE_USER_SITE and Path(site.getusersitepackages()).is_dir():
        folders.append(site.getusersitepackages())
    return folders


def venv_reusing_these_packages(venv: Path) -> Path:
    """A venv whose own site-packages is empty and which then sees this environment's
    packages, as ``--system-site-packages`` does for a base interpreter's: a ``.pth`` file
    adds them with ``site.addsitedir``, which reads their own ``.pth`` files (editable
    installs, namespace packages) too. Returns its python."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    lines = [f"import site; site.addsitedir({folder!r})" for folder in outer_site_dirs()]
    (Path(purelib) / "outer-site-packages.pth").write_text("\n".join(lines) + "\n")
    return python


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> dict:
    """The wheel installed into a venv that reuses this environment's packages: its python,
    an empty folder outside the checkout to run in and an environment without the
    checkout's PYTHONPATH. One venv for the tests below."""
    home = tmp_path_factory.mktemp("installed")
    # The installed dependencies are reused (torch is gigabytes); --ignore-installed puts
    # zmdevice itself into the venv even when the checkout is installed in editable mode,
    # and the venv's own site-packages comes before the reused ones.
    python = venv_reusing_these_packages(home / "venv")
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", str(wheel)],
        check=True, capture_output=True,
    )  # fmt: skip
    empty = home / "empty"
    empty.mkdir()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home)}  # no PYTHONPATH to the checkout
    return {"python": python, "cwd": empty, "env": env}


def test_installed_wheel_finds_everything_outside_the_checkout(installed):
    python, empty, env = installed["python"], installed["cwd"], installed["env"]
    code = (
        "import json, sys, zmdevice\n"
        "from zmdevice.catalog import catalog_dir, default_data_dir, list_entries\n"
        "print(json.dumps({'prefix': sys.prefix, 'package': zmdevice.__file__,\n"
        "    'catalog': str(catalog_dir()), 'data': str(default_data_dir()),\n"
        "    'entries': sorted(list_entries()),\n"
        "    'texts': (default_data_dir() / 'text' / 'unlabeled.csv').is_file()}))\n"
    )
    found = json.loads(
        subprocess.run(
            [python, "-c", code], cwd=empty, env=env, capture_output=True, text=True, check=True
        ).stdout
    )
    for key in ("package", "catalog", "data"):
        assert found[key].startswith(found["prefix"]), (key, found[key])
    assert {"minilm", "efficientnet-lite0", "distilbert", "mobilenet_v3_small"} <= set(
        found["entries"]
    )
    assert found["texts"]
    help_text = subprocess.run(
        [python, "-m", "zmdevice", "--help"], cwd=empty, env=env, capture_output=True, text=True
    )
    assert help_text.returncode == 0 and "demo" in help_text.stdout


ECOSYSTEM = """\
import time

started = time.perf_counter()
import csv, json, sys
from pathlib import Path

import datasets
from huggingface_hub import ModelCard
from mlflow.tracking import MlflowClient
from sklearn.model_selection import cross_val_score
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import zmdevice
from zmdevice.cli import main

data, teacher = Path(sys.argv[1]), sys.argv[2]
seconds = {"imports": time.perf_counter() - started}
fast = dict(threads=1, kd_steps=2, ssl_steps=2, log_every=1, eval_every=2, checkpoint_every=0,
            kd_batch_size=8, labeled_batch_size=3, unlabeled_batch_size=8, eval_batch_size=32,
            bn_recalibration_batches=1)
facts = {"cli_exit": None}  # main() returning is success too

# 1. The command line: train --log tensorboard, read back with TensorBoard's own reader.
sys.argv = ["zmdevice", "train", "--labeled", str(data / "labeled.csv"),
            "--unlabeled", str(data / "unlabeled.csv"), "--pseudo-labels",
            str(data / "labels.parquet"), "--student", "tiny-distilbert", "--device", "cpu",
            "--test", str(data / "test.csv"), "--out", "tb", "--log", "tensorboard"]
for key, value in fast.items():
    sys.argv += ["--" + key.replace("_", "-"), str(value)]
try:
    main()
except SystemExit as done:
    facts["cli_exit"] = done.code
events = EventAccumulator("tb/tensorboard")
events.Reload()
facts["tensorboard_scalars"] = sorted(events.Tags()["scalars"])
facts["tensorboard_kd_loss_steps"] = [event.step for event in events.Scalars("kd/loss")]
facts["metrics_kd_loss_steps"] = [
    record["global_step"]
    for record in map(json.loads, Path("tb/metrics.jsonl").read_text().splitlines())
    if record.get("stage") == "kd" and "loss" in record
]
seconds["cli_tensorboard"] = time.perf_counter() - started - sum(seconds.values())

# 2. The API on datasets.Dataset objects (the rows of the CSV files, ClassLabel labels),
# logged to MLflow's local store and read back through its client. The pseudo-label file
# was made from unlabeled.csv: training accepts it only if the Dataset has its ids and
# fingerprint.
def table(name):
    with open(data / name, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))

names = sorted({row["label"] for row in table("unlabeled.csv")})
features = datasets.Features({"id": datasets.Value("string"), "text": datasets.Value("string"),
                              "label": datasets.ClassLabel(names=names)})

def dataset(name):
    rows = table(name)
    columns = {key: [row[key] for row in rows] for key in ("id", "text")}
    columns["label"] = [names.index(row["label"]) for row in rows]
    return datasets.Dataset.from_dict(columns, features=features)

student = zmdevice.train(dataset("labeled.csv"), dataset("unlabeled.csv"),
                         data / "labels.parquet", student="tiny-distilbert", device="cpu",
                         out="ml", test=dataset("test.csv"), progress=False, log="mlflow",
                         **fast)
client = MlflowClient(tracking_uri=f"sqlite:///{Path('ml/mlflow.db').resolve()}")
(run,) = client.search_runs([client.get_experiment_by_name("zmdevice").experiment_id])
facts["mlflow"] = {
    "status": run.info.status,
    "student": run.data.params.get("student"),
    "kd_loss_steps": [m.step for m in client.get_metric_history(run.info.run_id, "kd/loss")],
    "test_accuracy": run.data.metrics.get("final/test_accuracy"),
    "artifacts": sorted(a.path for a in client.list_artifacts(run.info.run_id)),
}
facts["api_test_accuracy"] = student.summary["test_accuracy"]
seconds["api_datasets_mlflow"] = time.perf_counter() - started - sum(seconds.values())

# 3. The model card and the Hub folder, parsed by huggingface_hub's own card parser.
onnx_file = zmdevice.export(student, "export/m.onnx", card_license="mit", card_language=["en"],
                            card_dataset=["user/reviews"], card_intended_use="Sorting notes.",
                            hub_folder="hub")
card = ModelCard.load("hub/README.md")
facts["card"] = {"license": card.data.license, "language": card.data.language,
                 "datasets": card.data.datasets, "library_name": card.data.library_name,
                 "intended_use": "Sorting notes." in card.text}
facts["hub_files"] = sorted(path.name for path in Path("hub").iterdir())
classifier = zmdevice.load("hub/m.onnx")
facts["hub_classes"] = classifier.classes_.tolist()
facts["hub_predictions"] = list(classifier.predict(["the dog and a cat", "bread"]))
facts["onnx"] = str(onnx_file)
seconds["export_card_hub"] = time.perf_counter() - started - sum(seconds.values())

# 4. The scikit-learn estimator inside cross_val_score: each fold's clone labels its pool
# with the tiny teacher and trains a student.
rows = table("unlabeled.csv")[:18]
estimator = zmdevice.ZeroMatchClassifier(
    teacher=f"text-embed:{teacher}", student="tiny-distilbert", kd_steps=2, ssl_steps=2,
    device="cpu", train_options={key: fast[key] for key in fast if "steps" not in key})
scores = cross_val_score(estimator, [row["text"] for row in rows], [row["label"] for row in rows],
                         cv=2)
facts["cv_scores"] = scores.tolist()
seconds["cross_val_score"] = time.perf_counter() - started - sum(seconds.values())
facts["seconds"] = {key: round(value, 1) for key, value in seconds.items()}

facts["prefix"] = sys.prefix
facts["outside"] = sorted(  # zmdevice modules not loaded from the wheel's install
    name for name, module in sys.modules.items()
    if name.split(".")[0] == "zmdevice" and getattr(module, "__file__", None)
    and not module.__file__.startswith(sys.prefix))
Path("facts.json").write_text(json.dumps(facts))
"""
"""One script, run by the installed wheel from a folder outside the checkout: ``train --log
tensorboard`` on the command line, ``zmdevice.train`` on ``datasets.Dataset`` objects with
``log="mlflow"``, ``export`` with card options and a Hub folder, and ``ZeroMatchClassifier``
in ``cross_val_score``, on the tiny student and the tiny text-embed teacher."""


def test_installed_wheel_meets_trackers_datasets_hub_cards_and_scikit_learn(
    installed, text_data, embed_dir, tmp_path
):
    for package in ("tensorboard", "mlflow", "datasets", "huggingface_hub", "sklearn"):
        pytest.importorskip(package)
    run = tmp_path / "ecosystem"
    run.mkdir()
    (run / "ecosystem.py").write_text(ECOSYSTEM)
    env = {
        **installed["env"],
        "HOME": str(tmp_path),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "ZMDEVICE_CACHE": str(tmp_path / "cache"),
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        [installed["python"], "ecosystem.py", str(text_data), str(embed_dir)],
        cwd=run, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    facts = json.loads((run / "facts.json").read_text())
    print(f"ecosystem script, seconds per part: {facts['seconds']}")
    assert facts["outside"] == [], facts["outside"]
    assert facts["cli_exit"] in (0, None)
    assert {"kd/loss", "ssl/loss", "final/test_accuracy"} <= set(facts["tensorboard_scalars"])
    assert facts["tensorboard_kd_loss_steps"] == facts["metrics_kd_loss_steps"] == [1, 2]
    mlflow = facts["mlflow"]
    assert mlflow["status"] == "FINISHED" and mlflow["student"] == "tiny-distilbert"
    assert mlflow["kd_loss_steps"] == [1, 2]
    assert mlflow["test_accuracy"] == pytest.approx(facts["api_test_accuracy"])
    assert {"report.md", "curves.png"} <= set(mlflow["artifacts"])
    assert facts["card"] == {
        "license": "mit",
        "language": ["en"],
        "datasets": ["user/reviews"],
        "library_name": "zmdevice",
        "intended_use": True,
    }
    assert facts["hub_files"] == ["README.md", "config.json", "m.onnx", "m.tokenizer.json"]
    assert sorted(facts["hub_classes"]) == ["animal", "food", "plant"]
    assert set(facts["hub_predictions"]) <= set(facts["hub_classes"])
    assert len(facts["cv_scores"]) == 2
    assert all(0.0 <= score <= 1.0 for score in facts["cv_scores"])
