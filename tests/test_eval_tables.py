"""Progress bars on the retrieval, VCR and pretraining evaluations, and the W&B sample tables
of retrieval (top captions per image) and VCR (question, answers, predictions)."""

import json
import subprocess
import sys
from dataclasses import replace
from functools import partial

import pytest
import torch
from accelerate import Accelerator
from datasets import load_from_disk
from torch.utils.data import DataLoader

from conftest import BIN, FIXTURES, subprocess_env
from xmodaler_accel import progress
from xmodaler_accel.config import Config
from xmodaler_accel.data import load_tokenizer, synthetic_dir
from xmodaler_accel.models.pretrain import build_pretrain_model
from xmodaler_accel.models.retrieval import build_single_stream, build_two_stream
from xmodaler_accel.models.vcr import build_vcr_model
from xmodaler_accel.tasks.pretraining import (
    PretrainPairs,
    caption_specials,
    collate_pretrain,
    pretrain_metrics,
)
from xmodaler_accel.tasks.retrieval.evaluation import (
    EvalSettings,
    RetrievalSplit,
    evaluate_retrieval,
)
from xmodaler_accel.tasks.retrieval.samples import SAMPLE_COLUMNS, TopCaptions, sample_rows
from xmodaler_accel.tasks.vcr import VCRSplit, collate_choices, evaluate_vcr, predict_choices
from xmodaler_accel.tasks.vcr.evaluation import SAMPLE_COLUMNS as VCR_COLUMNS

SYNTHETIC = {"seed": 0, "feat_dim": 16, "num_train": 24, "num_val": 11, "num_test": 0}
BERT = {"bert_dir": "", "hidden": 32, "layers": 1, "heads": 2, "intermediate": 64}
BERT.update(dropout=0.0, pooling="cls")
TWO = {"hidden": 32, "embed_dim": 16, "image_layers": 1, "text_encoder": "transformer"}
TWO.update(text_layers=1, heads=2, dropout=0.0, loss="max_violation", margin=0.2, temperature=0.07)
CAPTIONER = {"d_model": 32, "num_heads": 2, "num_encoder_layers": 1, "num_decoder_layers": 1}
CAPTIONER.update(ffn_dim=64, dropout=0.0, visual_dropout=0.0, pred_dropout=0.0)
SETTINGS = EvalSettings(batch_size=60, image_chunk=3, similarity_chunk=4)


class RecordingWandb:
    """Stands in for accelerate's W&B tracker: records `log_table` calls."""

    name = "wandb"

    def __init__(self) -> None:
        self.tables: list[dict] = []

    def log_table(self, table_name, columns=None, data=None, step=None, **kwargs):
        self.tables.append({"name": table_name, "columns": columns, "data": data, "step": step})


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return synthetic_dir(tmp_path_factory.mktemp("tables_cache"), **SYNTHETIC)


@pytest.fixture(scope="module")
def data(root):
    return load_from_disk(str(root)), load_tokenizer(root / "wordpiece")


@pytest.fixture(scope="module")
def split(data):
    table, tokenizer = data
    return RetrievalSplit.from_table("val", table["val"], tokenizer)


@pytest.fixture(scope="module")
def models(data):
    _, tokenizer = data
    sizes = {"feat_dim": 16, "vocab_size": len(tokenizer), "pad_id": 0}
    torch.manual_seed(0)
    two = build_two_stream(Config(TWO), **sizes).eval()
    single = build_single_stream(Config(BERT), **sizes).eval()
    return two, single


@pytest.fixture()
def terminal(monkeypatch):
    """Bars show as on a terminal (pytest's stderr is not one)."""
    monkeypatch.setattr(progress, "on_terminal", lambda: True)


def recording_accelerator() -> tuple[Accelerator, RecordingWandb]:
    accelerator = Accelerator(cpu=True)
    tracker = RecordingWandb()
    accelerator.trackers.append(tracker)
    return accelerator, tracker


def vcr_setup(data):
    table, tokenizer = data
    model = build_vcr_model(
        Config({"ground_tags": True, "single_stream": BERT}),
        feat_dim=16,
        vocab_size=len(tokenizer),
        pad_id=tokenizer.pad_token_id,
    ).eval()
    collate = partial(collate_choices, pad_id=tokenizer.pad_token_id)
    return model, VCRSplit.from_dict(table, "val", tokenizer), collate


# Progress bars


@pytest.mark.parametrize(
    ("kind", "bars"),
    [
        ("two_stream", ["eval val images", "eval val captions"]),
        ("single_stream", ["eval val pairs"]),
        ("rerank", ["eval val i2t", "eval val t2i"]),
    ],
)
def test_retrieval_evaluation_shows_a_bar_per_slow_loop_on_a_terminal(
    split, models, terminal, capsys, kind, bars
):
    two, single = models
    model = two if kind == "two_stream" else single
    settings = replace(SETTINGS, rerank_k=3 if kind == "rerank" else 0)
    with torch.no_grad():
        evaluate_retrieval(Accelerator(cpu=True), model, [split], settings, two)
    err = capsys.readouterr().err
    for bar in bars:
        assert bar in err


def test_no_bar_is_drawn_off_a_terminal(split, models, monkeypatch, capsys):
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    two, single = models
    with torch.no_grad():
        evaluate_retrieval(
            Accelerator(cpu=True), single, [split], replace(SETTINGS, rerank_k=3), two
        )
    assert "eval val" not in capsys.readouterr().err


def test_vcr_evaluation_shows_q_to_a_and_qa_to_r_bars(data, terminal, capsys):
    model, vcr_split, collate = vcr_setup(data)
    evaluate_vcr(Accelerator(cpu=True), model, [vcr_split], batch_size=4, collate=collate)
    err = capsys.readouterr().err
    assert "eval val Q->A" in err and "eval val QA->R" in err


def test_pretraining_evaluation_shows_its_bar(data, root, terminal, capsys):
    table, tokenizer = data
    pairs = PretrainPairs(table["val"], tokenizer, load_tokenizer(root / "tokenizer"))
    torch.manual_seed(0)
    model = build_pretrain_model(
        Config({"single_stream": BERT, "transformer": CAPTIONER}),
        feat_dim=16,
        vocab_size=len(tokenizer),
        pad_id=0,
        caption_vocab_size=len(pairs.caption_tokenizer),
        caption_ids=caption_specials(pairs.caption_tokenizer)[:3],
        num_region_classes=9,
    ).eval()
    loader = DataLoader(pairs, batch_size=16, collate_fn=collate_pretrain)
    metrics = pretrain_metrics(
        Accelerator(cpu=True), model, loader, len(pairs), two_pass=False, desc="eval val"
    )
    assert "mlm_acc" in metrics
    assert "eval val" in capsys.readouterr().err


# Retrieval sample tables


def test_retrieval_table_ranks_each_images_best_captions_and_flags_its_own(split):
    # Image i scores its own third caption (row 5i+2) highest, then caption row 0, then row 54.
    scores = torch.zeros(split.num_images, split.num_captions)
    images = torch.arange(split.num_images)
    scores[images, 5 * images + 2] = 3.0
    scores[:, 0] += 2.0
    scores[:, 54] += 1.0
    top = TopCaptions(images=2, num_captions=split.num_captions, k=3)
    for captions in torch.arange(split.num_captions).split(20):  # blocks stream in
        top.add_block(images[:6], captions, scores[:6, captions])
    rows = sample_rows(split, *top.gather(Accelerator(cpu=True)))
    by_rank = [(r[1], r[2], r[3], r[4]) for r in rows]
    assert by_rank == [
        (1, split.captions_of(0)[2], 3.0, True),
        (2, split.captions_of(0)[0], 2.0, True),
        (3, split.captions_of(10)[4], 1.0, False),
        (1, split.captions_of(1)[2], 3.0, True),
        (2, split.captions_of(0)[0], 2.0, False),
        (3, split.captions_of(10)[4], 1.0, False),
    ]
    assert rows[0][0] == split.images.columns.value("image_id", 0)
    assert rows[3][5] == " | ".join(split.captions_of(1))


def test_two_stream_table_holds_the_top_five_captions_of_the_similarity_matrix(split, models):
    two, _ = models
    accelerator, tracker = recording_accelerator()
    with torch.no_grad():
        evaluate_retrieval(accelerator, two, [split], SETTINGS, step=7)
        images = two.embed_images(**split.regions(range(split.num_images), "cpu", 50))
        texts = two.embed_texts(split.input_ids, split.attention_mask)
    [table] = tracker.tables
    assert (table["name"], table["columns"], table["step"]) == ("val/samples", SAMPLE_COLUMNS, 7)
    assert len(table["data"]) == split.num_images * 5  # fewer images than the 16 sampled
    expected, rows = (images @ texts.T).topk(5, dim=1)
    for n, (image_id, rank, caption, score, truth, _) in enumerate(table["data"]):
        image, row = divmod(n, 5)
        assert image_id == split.images.columns.value("image_id", image) and rank == row + 1
        assert caption == split.caption_text(int(rows[image, row]))
        assert score == pytest.approx(float(expected[image, row]), abs=1e-5)
        assert truth == (int(split.caption_image[rows[image, row]]) == image)


@pytest.mark.parametrize("rerank_k", [0, 2])
def test_single_stream_table_lists_the_scored_captions(split, models, rerank_k):
    two, single = models
    accelerator, tracker = recording_accelerator()
    with torch.no_grad():
        evaluate_retrieval(accelerator, single, [split], replace(SETTINGS, rerank_k=rerank_k), two)
        regions = split.regions([0] * split.num_captions, "cpu", 50)
        image0 = single(split.input_ids, split.attention_mask, **regions)
    [table] = tracker.tables
    per_image = rerank_k or 5  # re-ranking shows only the re-scored candidates
    assert len(table["data"]) == split.num_images * per_image
    first = table["data"][:per_image]
    for _, _, caption, score, _, _ in first:
        rows = [r for r in range(split.num_captions) if split.caption_text(r) == caption]
        assert any(float(image0[r]) == pytest.approx(score, abs=1e-5) for r in rows)
    if not rerank_k:
        assert [r[3] for r in first] == pytest.approx(image0.topk(5).values.tolist(), abs=1e-5)


def test_without_wandb_no_table_is_logged(split, models):
    two, _ = models
    accelerator = Accelerator(cpu=True)
    tracker = RecordingWandb()
    tracker.name = "tensorboard"
    accelerator.trackers.append(tracker)
    with torch.no_grad():
        evaluate_retrieval(accelerator, two, [split], SETTINGS)
    assert tracker.tables == []


def test_two_process_tables_equal_one_process_tables(root, tmp_path):
    script = str(FIXTURES / "retrieval_tables_dist.py")

    def run(nproc: int) -> dict:
        out = tmp_path / f"tables{nproc}.json"
        cmd = [sys.executable, script]
        if nproc > 1:
            cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", script]
        proc = subprocess.run(
            [*cmd, str(root), str(out)],
            env=subprocess_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return json.loads(out.read_text())

    one, two = run(1), run(2)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert two["calls"] == {"0": 3, "1": 0}  # the main process logs, the other never does
    for kind in ("two_stream", "single_stream", "rerank"):
        assert one["tables"][kind]["data"], kind
        assert two["tables"][kind] == one["tables"][kind], kind


# VCR sample tables


def test_vcr_table_shows_the_predicted_and_correct_answer_and_rationale(data):
    model, vcr_split, collate = vcr_setup(data)
    accelerator, tracker = recording_accelerator()
    evaluate_vcr(accelerator, model, [vcr_split], batch_size=3, collate=collate, step=5)
    answers = predict_choices(accelerator, model, vcr_split.qa, batch_size=8, collate=collate)
    rationales = predict_choices(accelerator, model, vcr_split.qar, batch_size=8, collate=collate)
    [table] = tracker.tables
    assert (table["name"], table["columns"], table["step"]) == ("val/samples", VCR_COLUMNS, 5)
    questions = data[0]["vcr_val"]
    assert len(table["data"]) == len(questions)  # 11 items, fewer than the 16 sampled
    for item, row in enumerate(table["data"]):
        sample = dict(zip(VCR_COLUMNS, row))
        truth = questions[item]
        choices = [" ".join(words) for words in truth["answer_choices"]]
        reasons = [" ".join(words) for words in truth["rationale_choices"]]
        assert sample["annot_id"] == truth["annot_id"]
        assert sample["question"] == " ".join(truth["question"])
        assert sample["answers"].split(" | ")[2] == f"2: {choices[2]}"
        assert sample["predicted_answer"] == choices[answers[item]]
        assert sample["correct_answer"] == choices[truth["answer_label"]]
        assert sample["predicted_rationale"] == reasons[rationales[item]]
        assert sample["correct_rationale"] == reasons[truth["rationale_label"]]
