"""VCR pieces in one process: accuracy, malformed lines, batches, grounding, loaders, step modes."""

import json
from functools import partial

import pytest
import torch
from datasets import load_from_disk

from xmodaler_accel.config import Config
from xmodaler_accel.data import MalformedLineError, load_tokenizer, read_vcr, synthetic_dir
from xmodaler_accel.metrics.vcr import vcr_accuracy
from xmodaler_accel.models.vcr import MODEL_INPUTS, build_vcr_model
from xmodaler_accel.second_loader import SecondLoader
from xmodaler_accel.tasks.vcr import (
    VCRTaskDataset,
    collate_choices,
    concat_choice_batches,
    vcr_step,
)

SYNTHETIC = {"seed": 0, "feat_dim": 16, "num_train": 24, "num_val": 8, "num_test": 0}
TINY = {
    "ground_tags": True,
    "single_stream": {
        "bert_dir": "",
        "hidden": 32,
        "layers": 1,
        "heads": 2,
        "intermediate": 64,
        "dropout": 0.0,
        "pooling": "cls",
    },
}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = synthetic_dir(tmp_path_factory.mktemp("vcr_cache"), **SYNTHETIC)
    return load_from_disk(str(root)), load_tokenizer(root / "wordpiece")


def tiny_model(tokenizer, feat_dim=16, **changes):
    torch.manual_seed(0)
    cfg = Config({**TINY, **changes})
    return build_vcr_model(
        cfg, feat_dim=feat_dim, vocab_size=len(tokenizer), pad_id=tokenizer.pad_token_id
    )


def test_q_to_ar_counts_an_item_only_when_answer_and_rationale_are_right():
    answers, answer_labels = [0, 1, 2, 3, 0, 1, 2, 3], [0, 1, 2, 0, 0, 0, 2, 3]
    rationales, rationale_labels = [1, 1, 1, 1, 2, 2, 2, 2], [1, 0, 1, 1, 2, 2, 0, 2]
    # Answer right: items 0 1 2 4 6 7; rationale right: 0 2 3 4 5 7; both: 0 2 4 7.
    got = vcr_accuracy(answers, answer_labels, rationales, rationale_labels)
    assert got == {"Q->A": 75.0, "QA->R": 75.0, "Q->AR": 50.0}
    assert vcr_accuracy([1], [1], [0], [3]) == {"Q->A": 100.0, "QA->R": 0.0, "Q->AR": 0.0}
    with pytest.raises(ValueError, match="no label"):
        vcr_accuracy([0], [-1], [0], [0])


def vcr_json(**changes) -> str:
    item = {
        "question": ["Why", "is", [0], "here", "?"],
        "answer_choices": [["yes"], [[0], "waits"], ["no"], ["maybe"]],
        "rationale_choices": [["a"], ["b"], ["c"], [[1], "d"]],
        "answer_label": 1,
        "rationale_label": 3,
        "objects": ["person", "dog"],
        "img_fn": "movie/img1.jpg",
        "annot_id": "train-1",
    }
    return json.dumps({**item, **changes})


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"question": ["Why"', r"train.jsonl:3: malformed JSON line"),
        (vcr_json(answer_choices=[["yes"]] * 3), r"train.jsonl:3: answer_choices has 3 entries"),
        (vcr_json(question=["Why", [7], "?"]), r"train.jsonl:3: tag 7 does not index the 2"),
        ('{"question": []}', r"train.jsonl:3: missing keys"),
    ],
)
def test_malformed_vcr_line_gets_an_error_naming_its_line(tmp_path, bad_line, message):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join([vcr_json(), vcr_json(annot_id="train-2"), bad_line]) + "\n")
    with pytest.raises(MalformedLineError, match=message):
        read_vcr([path])


def words(tokenizer, ids) -> list[str]:
    """The words of a candidate sequence (the decoder glues punctuation to the word before)."""
    return tokenizer.decode(ids, skip_special_tokens=True).replace("?", " ?").split()


def test_choice_batches_keep_an_items_four_candidates_together(synthetic):
    data, tokenizer = synthetic
    qa = VCRTaskDataset.from_dict(data, "val", tokenizer, "qa")
    qar = VCRTaskDataset.from_dict(data, "val", tokenizer, "qar")
    row = data["vcr_val"][2]
    batch = collate_choices([qa[i] for i in range(3)], pad_id=tokenizer.pad_token_id)
    assert batch["input_ids"].shape[:2] == (3, 4) and batch["labels"][2] == row["answer_label"]
    assert batch["tags"].shape == batch["input_ids"].shape == batch["token_type_ids"].shape
    assert words(tokenizer, batch["input_ids"][2, 1]) == row["question"] + row["answer_choices"][1]
    # QA->R candidates: question + the right answer, then each rationale.
    item = qar[2]
    right = row["answer_choices"][row["answer_label"]]
    assert (
        words(tokenizer, item["input_ids"][0])
        == row["question"] + right + row["rationale_choices"][0]
    )
    assert item["label"] == row["rationale_label"] and qar.labels()[2] == row["rationale_label"]
    shifted = collate_choices([qa[i] for i in range(3)], use_global_v=True)["tags"]
    assert torch.equal(shifted, torch.where(batch["tags"] >= 0, batch["tags"] + 1, -1))
    assert (batch["tags"] >= 0).any()
    joint = concat_choice_batches(batch, collate_choices([qar[i] for i in range(2)]))
    assert joint["input_ids"].shape[:2] == (5, 4) and joint["features"].shape[0] == 5
    assert torch.equal(joint["tags"][:3, :, : batch["tags"].shape[2]], batch["tags"])


def test_tags_reach_the_model_only_through_their_regions(synthetic):
    data, tokenizer = synthetic
    dataset = VCRTaskDataset.from_dict(data, "val", tokenizer, "qa")
    batch = collate_choices([dataset[i] for i in range(4)], pad_id=tokenizer.pad_token_id)
    inputs = {k: batch[k] for k in MODEL_INPUTS}
    grounded, plain = tiny_model(tokenizer).eval(), tiny_model(tokenizer, ground_tags=False).eval()
    with torch.no_grad():
        scores = grounded(**inputs)
        assert scores.shape == (4, 4)
        assert not torch.allclose(scores, plain(**inputs))
        untagged = {**inputs, "tags": torch.full_like(inputs["tags"], -1)}
        assert torch.allclose(grounded(**untagged), plain(**inputs))


def test_second_loader_resumes_at_its_sample_position():
    from accelerate import Accelerator

    from xmodaler_accel import build_train_loader

    accelerator = Accelerator(cpu=True)
    data = torch.utils.data.TensorDataset(torch.arange(10))

    def second() -> SecondLoader:
        return SecondLoader(build_train_loader(data, 3, seed=5), accelerator)

    first = second()
    seen = [first.next_batch()[0].tolist() for _ in range(7)]  # 3 batches per epoch
    assert len(set(sum(seen[:3], []))) == 9 and seen[:3] != seen[3:6]  # reshuffled per epoch
    resumed = second()
    half = second()
    for _ in range(4):
        half.next_batch()
    assert half.state_dict() == {
        "epoch": 1,
        "samples_in_epoch": 3,
        "sampler_seed": 5,
        "global_batch_size": 3,
    }
    resumed.load_state_dict(half.state_dict())
    assert [resumed.next_batch()[0].tolist() for _ in range(3)] == seen[4:7]


def run_steps(tmp_path, synthetic, mode, steps=2):
    from accelerate import Accelerator

    from xmodaler_accel import Engine, build_train_loader

    data, tokenizer = synthetic
    accelerator = Accelerator(cpu=True)
    collate = partial(collate_choices, pad_id=tokenizer.pad_token_id)
    qa = VCRTaskDataset.from_dict(data, "train", tokenizer, "qa")
    qar = VCRTaskDataset.from_dict(data, "train", tokenizer, "qar")
    second = SecondLoader(build_train_loader(qar, 4, seed=2, collate_fn=collate), accelerator)
    model = tiny_model(tokenizer)
    engine = Engine(
        accelerator,
        model,
        torch.optim.Adam(model.parameters(), lr=1e-3),
        build_train_loader(qa, 4, seed=1, collate_fn=collate),
        partial(vcr_step, qar_loader=second, mode=mode),
        max_steps=steps,
        output_dir=tmp_path,
    )
    second.attach(engine, name="qar_loader")
    engine.run()
    return engine, second


@pytest.mark.parametrize(("mode", "updates_per_step"), [("sum", 1), ("alternate", 2)])
def test_step_modes_draw_both_loaders_and_update_once_or_per_sub_task(
    tmp_path, synthetic, mode, updates_per_step
):
    engine, second = run_steps(tmp_path, synthetic, mode)
    state = engine.optimizer.state_dict()["state"]
    assert {int(s["step"]) for s in state.values()} == {2 * updates_per_step}
    assert (engine.samples_in_epoch, second.samples_in_epoch) == (8, 8)
    assert set(engine.outputs) >= {"loss", "qa_loss", "qar_loss", "qa_acc", "qar_acc"}
    assert "qar_loader" in engine.events.stateful()
