"""The model card of a trained student (``README.md``), in the Hugging Face layout: YAML
front matter, then prose.

What the model is for, its license (the student preset's, for the preset's own weights;
never assumed), the FM teacher and its measured quality, the training data's fingerprint,
the budgets, the results and the limits. Training writes it (``report.write_report``);
``zmdevice export`` writes it next to the ONNX file as ``NAME.README.md``, with what the user
states (``--card-*``) applied (``exported_model_card``).
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path

CARD_GIVEN = ("license", "language", "datasets", "intended_use")
"""What the user may state about a model (``zmdevice export --card-*``, a ``[card]`` table)."""
CARD_FRONT_KEYS = ("license", "license_name", "license_link", "language", "datasets")
LIMITS = (
    "- Trained on few true labels: its accuracy is bounded by the teacher's knowledge and "
    "by how well the labeled samples cover each class; measure it on your own data "
    "(`zmdevice evaluate`).",
    "- The teacher's errors and biases (skewed class choices, prompt wording) carry over.",
    "- Inputs unlike the training data (another domain, language or image style) get "
    "confident answers that may be wrong.",
)


# ------------------------------------------------------------------------------ run files


def _yaml(value) -> str:
    """A YAML scalar or flow list: JSON's quoting is valid YAML."""
    return json.dumps(value, ensure_ascii=False)


def _label_file_metadata(train_config: dict) -> dict | None:
    """The metadata of the run's pseudo-label file, when it still exists and reads."""
    from zmdevice.errors import UserError
    from zmdevice.pseudolabels import read_pseudolabel_metadata

    path = train_config.get("pseudo_labels")
    if not path or not Path(path).is_file():
        return None
    try:
        return read_pseudolabel_metadata(path)
    except UserError:
        return None


def _base_model(student_config: dict) -> str | None:
    """The Hugging Face id the student's weights started from, when there is one."""
    from zmdevice.catalog import find_entry

    entry = find_entry(str(student_config.get("student", "")), "student") or {}
    weights = str(student_config.get("weights", ""))
    if entry.get("base_model") and weights == entry.get("weights"):
        return entry["base_model"]  # the preset's own weights, named in the catalog
    # distilbert:<hub id> (a local folder or file is no hub id; "random" is none)
    looks_like_hub_id = weights.count("/") == 1 and not Path(weights).exists()
    return weights if looks_like_hub_id and ":" not in weights else None


def _run_files(out: Path) -> tuple[dict, dict, dict | None]:
    """A student folder's ``config.json``, ``train_config.toml`` and label file metadata."""
    student_config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    train_path = out / "train_config.toml"
    train_config = (
        tomllib.loads(train_path.read_text(encoding="utf-8")) if train_path.is_file() else {}
    )
    return student_config, train_config, _label_file_metadata(train_config)


# ------------------------------------------------------------------------------ facts


def model_card_facts(out: Path, given: dict | None = None) -> dict:
    """What a card states about a student's terms and use, and where each fact came from.

    The student preset's ``license`` (with ``license_name``/``license_link``/``license_note``)
    holds only while the run kept the preset's own weights: other weights carry their own
    terms, unknown here. The language is the preset's (same rule), else the teacher's
    catalog entry's. ``given`` (``CARD_GIVEN`` keys, None = not given) overrides each.

    Returns:
        ``license``, ``license_name``, ``license_link``, ``license_note`` (str or None),
        ``language`` and ``datasets`` (lists), ``intended_use`` (str or None), ``weights``
        (what the student started from), ``teacher`` and ``teacher_licence`` (str or None).
    """
    student_config, _, labels = _run_files(out)
    return _facts(student_config, labels, given)


def _facts(student_config: dict, labels: dict | None, given: dict | None) -> dict:
    """``model_card_facts`` from the run files already read."""
    from zmdevice.catalog import find_entry

    preset = find_entry(str(student_config.get("student", "")), "student") or {}
    weights = str(student_config.get("weights", "random"))
    own_weights = bool(preset) and weights == (preset.get("weights") or "random")
    teacher_name = ((labels or {}).get("teacher") or {}).get("name")
    teacher = find_entry(str(teacher_name), "teacher") if teacher_name else None
    license_keys = ("license", "license_name", "license_link", "license_note")
    facts = {key: preset.get(key) if own_weights else None for key in license_keys}
    language = (preset.get("language") if own_weights else None) or (teacher or {}).get("language")
    facts.update(
        language=[language] if isinstance(language, str) else list(language or []),
        datasets=[],
        intended_use=None,
        weights=weights,
        teacher=teacher_name,
        teacher_licence=(teacher or {}).get("licence"),
    )
    given = {key: value for key, value in (given or {}).items() if value is not None}
    if "license" in given and given["license"] != facts["license"]:
        # The user's license replaces the preset's, its name, link and note with it.
        facts.update(license_name=None, license_link=None, license_note=None)
    facts.update({key: given[key] for key in CARD_GIVEN if key in given})
    return facts


def _card_front_lines(facts: dict) -> list[str]:
    """The front matter lines of ``model_card_facts`` (first in the card, in this order)."""
    lines = [
        f"{key}: {_yaml(facts[key])}"
        for key in ("license", "license_name", "license_link")
        if facts.get(key)
    ]
    lines += [f"{key}: {_yaml(facts[key])}" for key in ("language", "datasets") if facts.get(key)]
    return lines


def _intended_use_lines(modality: str, facts: dict) -> list[str]:
    use = facts.get("intended_use") or (
        f"Classifying {modality}s like the training data into exactly these classes, on "
        "device: export it with `zmdevice export` and run the ONNX file with onnxruntime "
        "(no torch)."
    )
    return [
        use.strip(),
        "",
        "It always answers one of the classes above; it has no 'none of these' answer.",
    ]


def _license_lines(facts: dict) -> list[str]:
    if facts.get("license"):
        named = f" ({facts['license_name']})" if facts.get("license_name") else ""
        link = f", see {facts['license_link']}" if facts.get("license_link") else ""
        lines = [f"License: `{facts['license']}`{named}{link}."]
        if facts.get("license_note"):
            lines.append(facts["license_note"])
    else:
        lines = [
            f"License: not known here. The student started from the weights "
            f"`{facts.get('weights', '?')}`, which carry their own terms; state the license "
            "with `zmdevice export --card-license ID` once you know it."
        ]
    if facts.get("teacher"):
        licence = facts.get("teacher_licence") or "not in the catalog; check its terms"
        lines.append(f"The pseudo-labels came from the teacher `{facts['teacher']}` ({licence}).")
    return lines


# ------------------------------------------------------------------------------ updating


def update_model_card(text: str, facts: dict, modality: str) -> str:
    """``text`` (a card ``render_model_card`` wrote) with the front matter keys, the intended
    use and the license of ``facts``; the rest is kept. Applied to a card rendered from the
    same facts, it changes nothing."""
    if text.startswith("---\n") and "\n---\n" in text[4:]:
        end = text.index("\n---\n", 4)
        kept = [
            line for line in text[4:end].split("\n") if line.split(":", 1)[0] not in CARD_FRONT_KEYS
        ]
        text = "\n".join(["---", *_card_front_lines(facts), *kept]) + text[end:]
    text = _replace_section(text, "Intended use", _intended_use_lines(modality, facts))
    return _replace_section(text, "License", _license_lines(facts))


def _replace_section(text: str, heading: str, lines: list[str]) -> str:
    """The ``## heading`` section's body replaced by ``lines`` (appended when absent)."""
    body = "\n".join(["", *lines, ""])
    marker = f"\n## {heading}\n"
    start = text.find(marker)
    if start < 0:
        return text.rstrip("\n") + f"\n{marker}{body}"
    begin = start + len(marker)
    end = text.find("\n## ", begin)
    return text[:begin] + body + (text[end:] if end >= 0 else "\n")


def exported_model_card(model_dir: Path, given: dict | None = None) -> str:
    """The card ``zmdevice export`` writes: the training folder's ``README.md`` (or, when it
    is gone, one rendered from the folder's files) with the facts of ``given`` applied."""
    card = model_dir / "README.md"
    text = card.read_text(encoding="utf-8") if card.is_file() else render_model_card(model_dir, {})
    modality = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get(
        "modality", "image"
    )
    return update_model_card(text, model_card_facts(model_dir, given), modality)


# ------------------------------------------------------------------------------ rendering


@dataclass(frozen=True)
class CardRun:
    """What the card's sections are written from: a run folder's files and its summary."""

    name: str
    """The folder's name: the card's title and its model-index name."""
    summary: dict
    """``run_train``'s summary (``{}`` when the card is rendered from the files alone)."""
    student_config: dict
    train_config: dict
    labels: dict | None
    """The pseudo-label file's metadata (None when it is gone or there was none)."""
    facts: dict
    """``model_card_facts``."""

    @classmethod
    def read(cls, out: Path, summary: dict, given: dict | None) -> CardRun:
        student_config, train_config, labels = _run_files(out)
        facts = _facts(student_config, labels, given)
        return cls(out.name, summary, student_config, train_config, labels, facts)

    @property
    def modality(self) -> str:
        return self.student_config.get("modality", "image")

    @property
    def task(self) -> str:
        return f"{self.modality}-classification"

    @property
    def method(self) -> str:
        return self.summary.get("method", self.train_config.get("method", "zeromatch"))


def render_model_card(out: Path, summary: dict, given: dict | None = None) -> str:
    """The model card of a trained student folder (``README.md``), from its files.

    Reads ``config.json`` (student, classes, preprocessing, weights), ``train_config.toml``
    (data, budgets), the pseudo-label file's metadata (teacher, data fingerprint and, when
    the file was made with ``--gold``, the teacher's measured quality) and the catalog
    entries of the student preset and the teacher (license, language: ``model_card_facts``,
    where ``given`` overrides them).
    """
    run = CardRun.read(out, summary, given)
    lines = [
        *_front_matter(run),
        "",
        f"# {run.name}",
        "",
        _overview(run),
        *_section("Intended use", _intended_use_lines(run.modality, run.facts)),
        *_section("License", _license_lines(run.facts)),
        *_section("Foundation-model teacher", _teacher_lines(run)),
        *_section("Training data", _data_lines(run)),
        *_section("Training", _training_lines(run)),
        *_section("Results", _results_lines(run)),
        *_section("Limits", list(LIMITS)),
        "",
    ]
    return "\n".join(lines)


def _section(heading: str, body: list[str]) -> list[str]:
    return ["", f"## {heading}", "", *body]


def _front_matter(run: CardRun) -> list[str]:
    """The YAML front matter the Hub reads: terms, task, tags, base model, test results."""
    task = run.task
    tags = ["zmdevice", run.method, "knowledge-distillation", "semi-supervised", task, "onnx"]
    front = ["---", *_card_front_lines(run.facts), 'library_name: "zmdevice"']
    front += [f"pipeline_tag: {_yaml(task)}", f"tags: {_yaml(tags)}"]
    front.append(f"metrics: {_yaml(['accuracy', 'f1'])}")
    base_model = _base_model(run.student_config)
    if base_model:
        front.append(f"base_model: {_yaml(base_model)}")
    summary = run.summary
    if "test_accuracy" in summary:
        test_name = Path(str(run.train_config.get("test", "test"))).name
        front += [
            "model-index:",
            f"- name: {_yaml(run.name)}",
            "  results:",
            f"  - task: {{type: {_yaml(task)}}}",
            f"    dataset: {{name: {_yaml(test_name)}, type: {_yaml('custom')}}}",
            "    metrics:",
            f"    - {{type: accuracy, value: {summary['test_accuracy']:.4f}}}",
            f"    - {{type: f1, name: macro-F1, value: {summary['test_macro_f1']:.4f}}}",
        ]
    return [*front, "---"]


def _overview(run: CardRun) -> str:
    classes = list(run.student_config.get("classes", run.summary.get("classes", [])))
    student_name = run.summary.get("student", run.student_config.get("student", "?"))
    return (
        f"A {student_name} {run.modality} classifier over {len(classes)} classes "
        f"({', '.join(classes)}), trained by zmdevice with `--method {run.method}` "
        "from a foundation model's zero-shot pseudo-labels and a few true labels."
    )


def _teacher_lines(run: CardRun) -> list[str]:
    """The teacher, where its pseudo-labels came from and how good they measured."""
    labels, train_config = run.labels, run.train_config
    if labels is None:
        return [
            "No pseudo-label file was used (or it is no longer at the path the run "
            "recorded), so the teacher is not known here."
            if run.method not in ("zeromatch", "kd", "naive-pl")
            else f"Pseudo-labels from {train_config.get('pseudo_labels')} (the file is no "
            "longer there: teacher details unavailable)."
        ]
    teacher = labels.get("teacher", {})
    lines = [
        f"Teacher `{teacher.get('spec', '?')}`, run zero-shot once by `zmdevice label` "
        f"over {labels.get('data', {}).get('count', '?')} samples "
        f"(pseudo-label file `{Path(str(train_config.get('pseudo_labels'))).name}`, "
        f"created {labels.get('created', '?')})."
    ]
    quality = labels.get("quality")
    if not quality:
        return [*lines, "", "The teacher's accuracy was not measured (label without `--gold`)."]
    lines += [
        "",
        f"Measured against {quality.get('count', '?')} true labels "
        f"(`--gold {Path(str(quality.get('gold', '?'))).name}`): accuracy "
        f"{100 * quality['accuracy']:.1f}%, macro-F1 "
        f"{100 * quality.get('macro_f1', 0):.1f}%.",
    ]
    per_class = quality.get("per_class", {})
    if isinstance(per_class, dict) and per_class:
        recalls = ", ".join(
            f"{cls} {100 * row.get('recall', 0):.0f}%" for cls, row in per_class.items()
        )
        lines.append(f"Teacher recall per class: {recalls}.")
    return lines


def _data_lines(run: CardRun) -> list[str]:
    """How much data of which files, and the unlabeled data's fingerprint."""
    summary, train_config = run.summary, run.train_config
    lines = [
        f"{summary.get('labeled', '?')} labeled samples (`{train_config.get('labeled', '?')}`) "
        f"and {summary.get('unlabeled', '?')} unlabeled samples "
        f"(`{train_config.get('unlabeled', '?')}`)."
    ]
    fingerprint = (run.labels or {}).get("data", {}).get("fingerprint")
    if fingerprint:
        lines.append(
            f"Unlabeled data fingerprint (SHA-256 of ids and content, as `zmdevice` computes "
            f"it): `{fingerprint}`."
        )
    return lines


def _training_lines(run: CardRun) -> list[str]:
    """Method, seed, stages, batch sizes and learning rates, input size."""
    summary, train_config = run.summary, run.train_config
    hyper = {**train_config, **train_config.get("extra", {})}  # flat, or an [extra] table
    stage_text = "; ".join(
        f"{stage['stage']} {stage['steps']} steps ({stage['seconds']} s)"
        for stage in summary.get("stages", [])
    )
    lines = [
        f"Method `{run.method}`, seed {train_config.get('seed', '?')}, on "
        f"{summary.get('device', '?')} in {summary.get('seconds', '?')} s: "
        f"{stage_text or 'no stages'}."
    ]
    budget = {
        key: hyper[key]
        for key in ("kd_batch_size", "labeled_batch_size", "unlabeled_batch_size", "lr", "head_lr")
        if key in hyper
    }
    if budget:
        lines.append(
            "Batch sizes and learning rates: "
            + ", ".join(f"{key} {value}" for key, value in budget.items())
            + "; every setting is in `train_config.toml` (rerun with `--config`)."
        )
    preprocess = run.student_config.get("preprocess", {})
    if run.modality == "image":
        lines.append(f"Inputs: RGB resized to {preprocess.get('image_size', '?')} px.")
    else:
        lines.append(f"Inputs: at most {preprocess.get('max_length', '?')} tokens.")
    return lines


def _results_lines(run: CardRun) -> list[str]:
    """Stage-1 agreement with the teacher, test results, where the curves are."""
    summary, labels = run.summary, run.labels
    lines = []
    if "heldout_agreement" in summary:
        lines.append(
            f"- Stage 1 agreement with the teacher on held-out training samples: "
            f"{100 * summary['heldout_agreement']:.1f}% (step {summary.get('best_kd_step')})."
        )
    if "test_accuracy" in summary:
        lines.append(
            f"- Test (`{run.train_config.get('test')}`): accuracy "
            f"{100 * summary['test_accuracy']:.1f}%, macro-F1 "
            f"{100 * summary['test_macro_f1']:.1f}%."
        )
        if labels and labels.get("quality"):
            lines.append(
                f"- The teacher scored {100 * labels['quality']['accuracy']:.1f}% on its gold "
                "labels (other samples than the test set unless they are the same file)."
            )
    else:
        lines.append("- No test data was given (`--test`): accuracy not measured.")
    lines.append(
        "- Curves and per-stage numbers: `report.md` and `curves.png` in the training folder."
    )
    return lines
