"""LLaVA-Instruct-150K -> VQA rows (no poses)."""

from __future__ import annotations

import numpy as np
import pytest

from fixtures_realformat import write_llava_json
from poserft.data.converters import convert
from poserft.data.converters.common import ConversionError
from poserft.data.converters.config import DatasetsConfig, LlavaInstructSource
from poserft.data.converters.llava import (
    build_llava, read_llava_conversations)

CONVERSATIONS = [
    {"id": "000000033471", "image": "000000033471.jpg",
     "conversations": [{"from": "human", "value": "What are the colors of the bus in the image?\n<image>"},
                       {"from": "gpt", "value": "The bus in the image is white and red."},
                       {"from": "human", "value": "What feature can be seen on the back of the bus?"},
                       {"from": "gpt", "value": "The back of the bus features an advertisement."}]},
    {"id": "000000052846", "image": "000000052846.jpg",
     "conversations": [{"from": "human", "value": "<image>\nWhere is the cat positioned?"},
                       {"from": "gpt", "value": " The cat is on the car's hood. "}]},
]


def test_read_llava_pairs_turns(tmp_path):
    path = tmp_path / "llava_instruct_150k.json"
    write_llava_json(path, CONVERSATIONS)
    rows = read_llava_conversations(path)
    assert [(r["question"], r["answer"], r["image"], r["conversation"]) for r in rows] == [
        ("What are the colors of the bus in the image?", "The bus in the image is white and red.",
         "000000033471.jpg", 0),
        ("What feature can be seen on the back of the bus?",
         "The back of the bus features an advertisement.", "000000033471.jpg", 0),
        ("Where is the cat positioned?", "The cat is on the car's hood.", "000000052846.jpg", 1)]


@pytest.mark.parametrize("mutate, field", [
    (lambda c: c[1]["conversations"][0].__setitem__("from", "system"), "[1].conversations[0].from"),
    (lambda c: c[0]["conversations"].pop(0), "[0].conversations[0].from"),   # gpt turn first
    (lambda c: c[1].pop("image"), "image"),
    (lambda c: c[0]["conversations"][1].pop("value"), "value"),
])
def test_read_llava_malformed_names_the_field(tmp_path, mutate, field):
    import copy
    data = copy.deepcopy(CONVERSATIONS)
    mutate(data)
    path = tmp_path / "llava_instruct_150k.json"
    write_llava_json(path, data)
    with pytest.raises(ConversionError) as err:
        read_llava_conversations(path)
    assert str(path) in str(err.value) and field in str(err.value)


def test_llava_converts_to_vqa_only_file(tmp_path):
    from poserft.data.h5io import SplitReader, validate_split
    raw = tmp_path / "raw"
    write_llava_json(raw / "llava_instruct_150k.json", CONVERSATIONS)
    out = {"train": tmp_path / "train.h5"}
    cfg = DatasetsConfig.from_dict({"llava_instruct": {"image_root": "/coco"}}, where="datasets")
    convert("llava_instruct", cfg, raw, out, None, progress=False)
    assert validate_split(out["train"]) == {"N": 0, "Q": 3}
    r = SplitReader(out["train"])
    assert r.read("vqa/image_paths", 2) == "/coco/train2017/000000052846.jpg"
    np.testing.assert_array_equal(r.read("vqa/conversation_index"), [0, 0, 1])
    assert list(r.read("vqa/question"))[2] == "Where is the cat positioned?"
    assert r.read("poses/global_orient").shape == (0, 3)


def test_llava_val_split_by_image_is_disjoint_and_deterministic(tmp_path):
    convs = [{"id": str(i), "image": f"{i:012d}.jpg",
              "conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}
             for i in range(200)]
    write_llava_json(tmp_path / "llava_instruct_150k.json", convs)
    source = LlavaInstructSource.from_dict({"val_fraction": 0.25})
    built = build_llava(source, tmp_path, ["train", "val"])
    again = build_llava(source, tmp_path, ["val"])
    train_imgs = set(built["train"].arrays["vqa/image_paths"])
    val_imgs = set(built["val"].arrays["vqa/image_paths"])
    assert not train_imgs & val_imgs and len(train_imgs | val_imgs) == 200
    assert 25 <= len(val_imgs) <= 75                     # ~25% of 200 images
    assert built["val"].arrays["vqa/question"] == again["val"].arrays["vqa/question"]
    assert built["train"].arrays["poses/global_orient"].shape == (0, 3)
