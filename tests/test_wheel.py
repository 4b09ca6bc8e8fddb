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


def test_installed_wheel_finds_everything_outside_the_checkout(wheel, tmp_path):
    # The installed dependencies are reused (torch is gigabytes); --ignore-installed puts
    # zmdevice itself into the venv even when the checkout is installed in editable mode,
    # and the venv's own site-packages comes before the reused ones.
    python = venv_reusing_these_packages(tmp_path / "venv")
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", str(wheel)],
        check=True, capture_output=True,
    )  # fmt: skip
    empty = tmp_path / "empty"
    empty.mkdir()
    code = (
        "import json, sys, zmdevice\n"
        "from zmdevice.catalog import catalog_dir, default_data_dir, list_entries\n"
        "print(json.dumps({'prefix': sys.prefix, 'package': zmdevice.__file__,\n"
        "    'catalog': str(catalog_dir()), 'data': str(default_data_dir()),\n"
        "    'entries': sorted(list_entries()),\n"
        "    'texts': (default_data_dir() / 'text' / 'unlabeled.csv').is_file()}))\n"
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}  # no PYTHONPATH to the checkout
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
