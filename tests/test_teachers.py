"""Teachers: the zero-shot maths, each kind on a tiny offline model, and every error message
(what every kind must do, walked over the registry, is ``test_teachers_registry.py``)."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import tiny_teachers
import torch
from PIL import Image

from zmdevice.classes import ClassList
from zmdevice.errors import UserError
from zmdevice.teachers import build_teacher
from zmdevice.teachers.base import cast_weights, class_weights, zero_shot_probs
from zmdevice.teachers.clip import fill_template, load_templates
from zmdevice.teachers.imagenet import (
    imagenet_class_names,
    load_weights_in_order,
    name_similarity,
    similarity_map,
)
from zmdevice.teachers.llm import map_answer

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent
TOPICS = ClassList(["sports", "politics", "science"], {})


def images(count, size=40):
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(count)
    ]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    return {
        "embed": tiny_teachers.make_text_embed(root / "embed"),
        "nli": tiny_teachers.make_nli(root / "nli"),
        "clip": tiny_teachers.make_clip_checkpoint(root),
        "root": root,
    }


def test_zero_shot_maths_picks_the_class_built_into_the_embeddings():
    # Class c's two prompts point near axis c; their normalised mean is axis c exactly.
    eye = torch.eye(4)
    per_class = [
        torch.nn.functional.normalize(
            torch.stack([eye[c] + 0.3 * eye[3], eye[c] - 0.3 * eye[3]]), dim=-1
        )
        for c in range(3)
    ]
    weights = class_weights(per_class)
    torch.testing.assert_close(weights, eye[:3])
    features = torch.nn.functional.normalize(
        torch.tensor([[0.1, 1.0, 0.0, 0.2], [1.0, 0.0, 0.2, 0.0]]), dim=-1
    )
    probs = zero_shot_probs(features, weights, scale=100.0)
    assert probs.argmax(1).tolist() == [1, 0]
    torch.testing.assert_close(probs, torch.softmax(100.0 * features @ eye[:3].T, dim=-1))


def test_templates_paper_openai_and_file(tmp_path):
    assert load_templates(None) == ["This is a photo of {label}."]
    assert fill_template(load_templates("paper")[0], "cat") == "This is a photo of cat."
    openai = load_templates("openai")
    assert len(openai) == 80 and "cat" in fill_template(openai[0], "cat")
    (tmp_path / "t.txt").write_text("# mine\na {label} photo\n{} again\n")
    assert [fill_template(t, "dog") for t in load_templates(str(tmp_path / "t.txt"))] == [
        "a dog photo",
        "dog again",
    ]
    (tmp_path / "bad.txt").write_text("no slot here\n")
    with pytest.raises(UserError, match=r"every line needs \{label\}.*'no slot here'"):
        load_templates(str(tmp_path / "bad.txt"))
    with pytest.raises(UserError, match="--templates nope.txt: use paper, openai"):
        load_templates("nope.txt")


def test_clip_from_local_checkpoint_matches_the_model_and_its_maths(models):
    import open_clip

    classes = ClassList(["cat", "dog", "car"], {"car": ["a red car", "a blue car"]})
    teacher = build_teacher(f"clip:zm-tiny-clip:{models['clip']}", classes)
    assert teacher.modality == "image" and teacher.info["prompts"]["cat"] == [
        "This is a photo of cat."
    ]
    assert teacher.info["prompts"]["car"] == ["a red car", "a blue car"]
    batch = images(3)
    probs = teacher.predict_items(batch)
    assert probs.shape == (3, 3)
    torch.testing.assert_close(probs.sum(1), torch.ones(3))
    # Reference: the same checkpoint loaded directly, the recipe written out by hand.
    model, _, preprocess = open_clip.create_model_and_transforms(
        "zm-tiny-clip", pretrained=str(models["clip"])
    )
    model.eval()
    tokenizer = open_clip.get_tokenizer("zm-tiny-clip")
    with torch.no_grad():
        text = []
        for prompts in (
            ["This is a photo of cat."],
            ["This is a photo of dog."],
            ["a red car", "a blue car"],
        ):
            emb = model.encode_text(tokenizer(prompts))
            emb = emb / emb.norm(dim=-1, keepdim=True)
            text.append(emb.mean(0) / emb.mean(0).norm())
        image = model.encode_image(torch.stack([preprocess(im) for im in batch]))
        image = image / image.norm(dim=-1, keepdim=True)
        expected = (model.logit_scale.exp() * image @ torch.stack(text).T).softmax(-1)
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=1e-4)
    assert not teacher.model.training
    assert not any(p.requires_grad for p in teacher.model.parameters())
    openai = build_teacher(f"clip:zm-tiny-clip:{models['clip']}", classes, templates="openai")
    assert len(openai.info["prompts"]["cat"]) == 80


def test_clip_errors(models, tmp_path):
    with pytest.raises(UserError, match="teacher weights not found: /no/such/ckpt.pt"):
        build_teacher("clip:zm-tiny-clip:/no/such/ckpt.pt", TOPICS)
    with pytest.raises(UserError, match="unknown open_clip architecture 'NoSuchArch'"):
        build_teacher("clip:NoSuchArch:openai", TOPICS)
    with pytest.raises(UserError, match=r"give clip:<arch>:<pretrained tag or file>"):
        build_teacher("clip:zm-tiny-clip", TOPICS)


def test_text_embed_is_frozen_normalised_and_uses_descriptions(models):
    classes = ClassList(["sports", "politics"], {"politics": ["vote law election"]})
    teacher = build_teacher(f"text-embed:{models['embed']}", classes)
    assert teacher.info["prompts"] == {"sports": ["sports"], "politics": ["vote law election"]}
    probs = teacher.predict_items(["the game team ball", "vote law", "atom cell"])
    assert probs.shape == (3, 2)
    torch.testing.assert_close(probs.sum(1), torch.ones(3))
    # The description itself is most similar to its own class (cosine 1 vs < 1).
    assert teacher.predict_items(["vote law election", "sports"]).argmax(1).tolist() == [1, 0]


def test_nli_softmaxes_entailment_logits_over_classes(models):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    teacher = build_teacher(f"nli:{models['nli']}", TOPICS)
    texts = ["the game team ball", "atom cell experiment"]
    probs = teacher.predict_items(texts)
    model = AutoModelForSequenceClassification.from_pretrained(models["nli"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(models["nli"])
    with torch.no_grad():
        rows = []
        for text in texts:
            pairs = tokenizer(
                [text] * 3,
                [f"This example is {c}." for c in TOPICS.names],
                padding=True,
                return_tensors="pt",
            )
            rows.append(model(**pairs).logits[:, 2].softmax(0))
    torch.testing.assert_close(probs, torch.stack(rows), atol=1e-5, rtol=1e-4)


def test_nli_without_entailment_label_is_an_error(tmp_path):
    folder = tiny_teachers.make_nli(tmp_path / "m", entail_name="yes")
    with pytest.raises(UserError, match="has no 'entailment' label.*contradiction, neutral, yes"):
        build_teacher(f"nli:{folder}", TOPICS)


def test_map_answer_exact_prefix_substring_and_none():
    names = ["boot", "ankle boot", "bag", "Sci/Tech"]
    assert map_answer("Bag", names) == 2
    assert map_answer("ankle boot, clearly", names) == 1
    assert map_answer("boot.", names) == 0
    assert map_answer("it is about sci tech news", names) == 3
    assert map_answer("a boot or a bag", names) is None  # two classes named: ambiguous
    assert map_answer("", names) is None


def test_llm_generation_maps_answers_and_counts_unmappable(tmp_path):
    folder = tiny_teachers.make_llm(tmp_path / "sports", favourite="sports")
    teacher = build_teacher(f"llm:{folder}", TOPICS)
    probs = teacher.predict_items(["the game team", "vote law"])
    assert probs.argmax(1).tolist() == [0, 0]
    assert teacher.stats == {"answers": 2, "mapped": 2, "unmapped": 0}
    babble = tiny_teachers.make_llm(tmp_path / "the", favourite="the")
    teacher = build_teacher(f"llm:{babble}", TOPICS)
    probs = teacher.predict_items(["the game team"])
    assert teacher.stats["unmapped"] == 1
    torch.testing.assert_close(probs.sum(1), torch.ones(1))
    scored = build_teacher(f"llm:{folder}:score", TOPICS)
    assert scored.predict_items(["atom cell"]).argmax(1).tolist() == [0]  # "sports" most likely


def test_llm_seq2seq_generates_or_scores_and_every_answer_is_counted(tmp_path):
    folder = tiny_teachers.make_seq2seq(tmp_path / "t5")
    teacher = build_teacher(f"llm:{folder}", TOPICS)
    probs = teacher.predict_items(["the game team", "vote law", "atom"])
    torch.testing.assert_close(probs.sum(1), torch.ones(3))
    assert teacher.stats["answers"] == 3
    assert teacher.stats["mapped"] + teacher.stats["unmapped"] == 3
    scored = build_teacher(f"llm:{folder}:score", TOPICS).predict_items(["the game team"])
    assert scored.shape == (1, 3) and (scored > 0).all()


def test_imagenet_teacher_with_map_file_and_in_order_weights(tmp_path):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=1000).eval()
    # Keys renamed: loading must fall back to matching tensors in order.
    state = {
        k if k.endswith("num_batches_tracked") else f"w{i}": v
        for i, (k, v) in enumerate(model.state_dict().items())
    }
    torch.save(state, tmp_path / "w.pth")
    (tmp_path / "map.toml").write_text('[map]\ncat = ["tabby", 282]\ndog = ["beagle", "pug"]\n')
    classes = ClassList(["cat", "dog"], {})
    teacher = build_teacher(
        f"imagenet:test_efficientnet:{tmp_path / 'w.pth'}:map={tmp_path / 'map.toml'}:size=32",
        classes,
    )
    assert teacher.info["preprocess"]["image_size"] == 32
    batch = images(2)
    probs = teacher.predict_items(batch)
    x = torch.stack([teacher.prepare(im) for im in batch])
    with torch.no_grad():
        full = model(x).softmax(-1)
    names = [s[0].lower() for s in imagenet_class_names()]
    cat = full[:, [names.index("tabby"), 282]].sum(1)
    dog = full[:, [names.index("beagle"), names.index("pug")]].sum(1)
    expected = torch.stack([cat, dog], 1)
    torch.testing.assert_close(
        probs, expected / expected.sum(1, keepdim=True), atol=1e-5, rtol=1e-4
    )


def test_name_similarity_mapping_is_generic():
    assert name_similarity("ankle-boot", "cowboy boot") == 0.8
    assert name_similarity("sandals", "sandal") == 1.0
    matrix = similarity_map(ClassList(["sandal", "coat", "bag"], {}), tiny_imagenet())
    assert matrix[:, 1].sum() == 2 and matrix[:, 0].sum() == 1 and matrix[:, 2].sum() == 1
    with pytest.raises(UserError, match="no ImageNet class matches the class.*trouser.*map file"):
        similarity_map(ClassList(["sandal", "trouser"], {}), tiny_imagenet())
    # A description that names an ImageNet class rescues a class the name alone misses.
    described = similarity_map(
        ClassList(["sandal", "trouser"], {"trouser": ["jeans"]}), tiny_imagenet()
    )
    assert described[3, 1] == 1


def tiny_imagenet():
    return [
        ["sandal"],
        ["trench coat"],
        ["lab coat", "laboratory coat"],
        ["jean", "blue jean", "denim"],
        ["plastic bag"],
    ]


def test_in_order_loading_rejects_a_file_of_another_model(tmp_path):
    import timm

    model = timm.create_model("test_efficientnet", num_classes=1000)
    torch.save({"x": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="does not fit this model"):
        load_weights_in_order(model, tmp_path / "other.pth")
    (tmp_path / "junk.pth").write_text("junk")
    with pytest.raises(UserError, match="cannot read weights file .*junk.pth"):
        load_weights_in_order(model, tmp_path / "junk.pth")


def test_a_bf16_teacher_runs_cast_weights_with_autocasts_results_bit_for_bit(models):
    teacher = build_teacher(f"text-embed:{models['embed']}", TOPICS, precision="bf16")
    network = teacher.network
    linear = [m for m in network.runs.modules() if isinstance(m, torch.nn.Linear)]
    assert linear and all(m.weight.dtype == torch.bfloat16 for m in linear)
    assert {p.dtype for p in network.module.parameters()} == {torch.float32}  # fp32 kept
    batch = teacher.collate(["the game team ball", "vote law", "atom cell split apart"])
    inputs = (batch["input_ids"], batch["attention_mask"])
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = network.module(*inputs).float()
    with torch.inference_mode():
        assert torch.equal(network(*inputs), autocast)


def test_cast_weights_shares_what_it_does_not_cast_and_keeps_tied_weights():
    embedding = torch.nn.Embedding(10, 4)
    tied = torch.nn.Linear(4, 10, bias=False)
    tied.weight = embedding.weight  # as a language model's output layer
    module = torch.nn.Sequential(embedding, torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), tied)
    copied = cast_weights(module, torch.bfloat16)
    assert copied[1].weight.dtype == copied[1].bias.dtype == torch.bfloat16
    assert copied[0].weight is embedding.weight and copied[3].weight is embedding.weight
    assert copied[2].weight is module[2].weight  # norms stay fp32, shared
    assert module[1].weight.dtype == torch.float32


def test_an_onnx_runtime_teacher_pickles_and_reopens_its_cached_export(
    models, tmp_path, monkeypatch
):
    monkeypatch.setenv("ZMDEVICE_CACHE", str(tmp_path / "cache"))
    teacher = build_teacher(f"text-embed:{models['embed']}", TOPICS, runtime="onnx")
    copy = pickle.loads(pickle.dumps(teacher))
    texts = ["the game team", "vote law election"]
    assert copy.info["runtime"] == "onnx"
    torch.testing.assert_close(copy.predict_items(texts), teacher.predict_items(texts))


def test_unknown_teacher_and_missing_weights_are_one_line_errors(tmp_path):
    with pytest.raises(
        UserError, match=r"unknown --teacher 'gpt9'.*minilm.*kind one of clip, text-embed"
    ):
        build_teacher("gpt9", TOPICS)
    with pytest.raises(UserError, match="teacher weights not found: .*missing.pth"):
        build_teacher(f"imagenet:test_efficientnet:{tmp_path / 'missing.pth'}", TOPICS)
    with pytest.raises(UserError, match="'not_a_model' is not a timm model name"):
        build_teacher("imagenet:not_a_model:x.pth", TOPICS)
    with pytest.raises(UserError, match="cannot load the text-embed teacher"):
        build_teacher(f"text-embed:{tmp_path}", TOPICS)


@pytest.mark.slow
def test_real_minilm_separates_obvious_topics():
    classes = ClassList(["animal", "food"], {})
    teacher = build_teacher("minilm", classes)
    probs = teacher.predict_items(["a large striped cat of the jungle", "a sweet baked dessert"])
    assert probs.argmax(1).tolist() == [0, 1]


@pytest.mark.slow
def test_real_efficientnet_lite0_loads_and_maps_fashion_classes():
    from zmdevice.classes import load_classes

    classes = load_classes(str(ROOT / "examples/default/images/classes.toml"))
    teacher = build_teacher("efficientnet-lite0", classes)
    assert teacher.info["class_map"].endswith("fashion-mnist-imagenet.json")
    probs = teacher.predict_items(images(2))
    assert probs.shape == (2, 10)
    torch.testing.assert_close(probs.sum(1), torch.ones(2))
    assert teacher.info["preprocess"]["image_size"] == 128
    bigger = build_teacher("efficientnet-lite0:size=224", classes)
    assert bigger.prepare(images(1)[0]).shape == (3, 224, 224)
    with pytest.raises(UserError, match="only imagenet teachers take options"):
        build_teacher("minilm:size=3", classes)
