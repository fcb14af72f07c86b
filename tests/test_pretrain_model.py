"""The TDEN-style pretraining model, its two-stage step and the pretrained -> fine-tune path."""

import logging

import pytest
import torch
from accelerate import Accelerator
from datasets import load_from_disk
from safetensors.torch import save_model
from transformers import BertConfig, BertModel

from xmodaler_accel import Engine, build_train_loader, load_weights
from xmodaler_accel.checkpoint import CheckpointError
from xmodaler_accel.config import Config
from xmodaler_accel.data import load_tokenizer, synthetic_dir
from xmodaler_accel.models.pretrain import (
    build_pretrain_model,
    export_finetune_weights,
    second_stage_batch,
)
from xmodaler_accel.models.retrieval import build_single_stream
from xmodaler_accel.models.transformer import TransformerCaptioner
from xmodaler_accel.models.vcr import build_vcr_model
from xmodaler_accel.objectives import IGNORE_INDEX
from xmodaler_accel.tasks.pretraining import (
    PretrainPairs,
    caption_specials,
    collate_pretrain,
    pretrain_step,
)
from xmodaler_accel.tasks.pretraining.evaluation import count_names, pair_counts

SYNTHETIC = {"seed": 0, "feat_dim": 16, "num_train": 40, "num_val": 8, "num_test": 0}
SINGLE = {"bert_dir": "", "hidden": 32, "layers": 1, "heads": 2, "intermediate": 64}
SINGLE.update(dropout=0.1, pooling="cls")
CAPTIONER = {"d_model": 32, "num_heads": 2, "num_encoder_layers": 1, "num_decoder_layers": 1}
CAPTIONER.update(ffn_dim=64, dropout=0.1, visual_dropout=0.1, pred_dropout=0.1, tie_embeddings=True)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = synthetic_dir(tmp_path_factory.getbasetemp() / "pretrain_cache", **SYNTHETIC)
    data = load_from_disk(str(root))
    pairs = PretrainPairs(
        data["train"], load_tokenizer(root / "wordpiece"), load_tokenizer(root / "tokenizer")
    )
    return pairs


def make_model(pairs, **single):
    torch.manual_seed(0)
    cfg = Config({"single_stream": {**SINGLE, **single}, "transformer": CAPTIONER})
    return build_pretrain_model(
        cfg,
        feat_dim=16,
        vocab_size=len(pairs.tokenizer),
        pad_id=0,
        caption_vocab_size=len(pairs.caption_tokenizer),
        caption_ids=caption_specials(pairs.caption_tokenizer)[:3],
        num_region_classes=9,
    )


@pytest.fixture
def batch(parts):
    return collate_pretrain([parts[i] for i in range(0, 60, 5)], max_feat_num=50)


def test_forward_gives_every_head_and_scores_pairs_then_negatives(parts, batch):
    model = make_model(parts)
    (out,) = model(batch)
    rows, length = batch["input_ids"].shape
    regions = batch["features"].shape[1]
    assert out["mlm_logits"].shape == (rows, length, len(parts.tokenizer))
    assert out["region_logits"].shape == (rows, regions, 9)
    assert out["region_features"].shape == (rows, regions, 16)
    assert out["itm_logits"].shape == (2 * rows,)  # clean pairs, then negatives
    assert out["caption_logits"].shape == (
        *batch["caption_input"].shape,
        len(parts.caption_tokenizer),
    )
    assert model.mlm.decoder.weight is model.encoder.bert.embeddings.word_embeddings.weight


def test_second_stage_sees_first_stage_predictions_exactly_at_masked_positions(parts, batch):
    model = make_model(parts).eval()
    with torch.no_grad():
        first = model.run_pass(batch, itm=True)
    second = second_stage_batch(batch, first)
    masked = batch["mlm_labels"] != IGNORE_INDEX
    words = first["mlm_logits"].argmax(-1)
    assert masked.any()
    assert torch.equal(second["input_ids"][masked], words[masked])
    assert torch.equal(second["input_ids"][~masked], batch["input_ids"][~masked])
    flags = batch["caption_masked"]
    guesses = first["caption_logits"].argmax(-1)  # position t - 1 predicts word t
    assert flags.any() and not flags[:, 0].any()
    assert torch.equal(second["caption_input"][flags], guesses[:, :-1][flags[:, 1:]])
    assert torch.equal(second["caption_input"][~flags], batch["caption_input"][~flags])
    for key in ("mlm_labels", "caption_target", "features", "negative_ids"):
        assert second[key] is batch[key]


class Spy:
    """Records every call of the model: its batch, its outputs and one weight at that time."""

    def __init__(self, model):
        self.calls = []
        self.steps = 0
        model.register_forward_hook(self.hook, with_kwargs=True)
        self.weight = model.encoder.bert.embeddings.word_embeddings.weight

    def hook(self, module, args, kwargs, outputs):
        self.calls.append((args[0], kwargs, outputs, self.weight.detach().clone()))

    def count_step(self, *args):
        self.steps += 1


def run_engine(parts, tmp_path, steps=1, grad_accum=1, **step_kwargs):
    from functools import partial

    model = make_model(parts)
    spy = Spy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    optimizer.register_step_post_hook(spy.count_step)
    loader = build_train_loader(parts, 8, seed=0, collate_fn=collate_pretrain)
    engine = Engine(
        Accelerator(cpu=True, gradient_accumulation_steps=grad_accum), model, optimizer, loader,
        partial(pretrain_step, **step_kwargs), max_steps=steps, output_dir=tmp_path,
        clip_grad="norm", clip_grad_max=1.0,
    )  # fmt: skip
    engine.run()
    return engine, spy


def test_separate_two_stage_steps_twice_and_feeds_stage_one_predictions(parts, tmp_path):
    engine, spy = run_engine(parts, tmp_path, steps=2, two_stage="separate")
    assert spy.steps == 4 and len(spy.calls) == 4  # two optimizer steps and two passes per batch
    for first, second in (spy.calls[0:2], spy.calls[2:4]):
        batch, _, (out,), weight_before = first
        refined, kwargs, _, weight_after = second
        assert kwargs == {"itm": False}
        expected = second_stage_batch(batch, out)
        for key in ("input_ids", "caption_input"):
            assert torch.equal(refined[key], expected[key]), key
        changed = refined["input_ids"] != batch["input_ids"]
        assert not (changed & (batch["mlm_labels"] == IGNORE_INDEX)).any()
        assert not torch.equal(weight_before, weight_after)  # stage one was stepped before
    outputs = engine.outputs
    assert {"loss_s1", "loss_s2", "itm_acc", "mlm_acc_s2", "grad_norm_s1"} <= outputs.keys()
    assert torch.equal(outputs["loss"].detach(), outputs["loss_s2"])
    assert "itm_acc_s2" not in outputs  # no matching in the second stage (as X-modaler)


def test_summed_two_stage_is_one_forward_and_one_step(parts, tmp_path):
    engine, spy = run_engine(parts, tmp_path, steps=2, two_stage="summed")
    assert spy.steps == 2 and len(spy.calls) == 2
    assert spy.calls[0][1] == {"two_pass": True} and len(spy.calls[0][2]) == 2
    out = engine.outputs
    assert out["loss"].item() == pytest.approx((out["loss_s1"] + out["loss_s2"]).item(), rel=1e-6)


def test_two_stage_off_is_stage_one_only(parts, tmp_path):
    engine, spy = run_engine(parts, tmp_path, two_stage="off")
    assert spy.steps == 1 and len(spy.calls) == 1
    assert not any(key.endswith("_s2") for key in engine.outputs)


def test_separate_two_stage_refuses_gradient_accumulation(parts, tmp_path):
    with pytest.raises(ValueError, match="grad_accum"):
        run_engine(parts, tmp_path, grad_accum=2, two_stage="separate")


def test_loss_weights_scale_the_objectives(parts, tmp_path):
    weights = {"mlm": 1.0, "mrm_class": 0.0, "mrm_feature": 0.0, "itm": 0.0, "caption": 0.0}
    engine, _ = run_engine(parts, tmp_path, two_stage="off", weights=weights)
    out = engine.outputs
    assert out["loss"].item() == pytest.approx(out["loss_mlm"].item(), rel=1e-6)


# --------------------------------------------------------------------------- fine-tuning path
def test_exported_weights_load_strictly_into_retrieval_vcr_and_captioner(parts, tmp_path):
    model = make_model(parts)
    paths = export_finetune_weights(model, tmp_path)
    state = model.state_dict()
    sizes = {"feat_dim": 16, "vocab_size": len(parts.tokenizer), "pad_id": 0}

    retrieval = build_single_stream(Config(SINGLE), **sizes)
    load_weights(retrieval, paths["retrieval"])  # strict: every key matches
    for key, value in retrieval.state_dict().items():
        assert torch.equal(value, state[key]), key

    vcr = build_vcr_model(Config({"single_stream": SINGLE, "ground_tags": True}), **sizes)
    load_weights(vcr, paths["vcr"])
    types = vcr.encoder.bert.embeddings.token_type_embeddings.weight
    pretrained = state["encoder.bert.embeddings.token_type_embeddings.weight"]
    assert torch.equal(types[0], pretrained[0]) and torch.equal(types[1], pretrained[0])
    assert torch.equal(types[2], pretrained[1])  # VCR's region type = the pretrained one

    captioner = TransformerCaptioner(len(parts.caption_tokenizer), 16, **CAPTIONER)
    load_weights(captioner, paths["captioner"])
    for key, value in captioner.state_dict().items():
        assert torch.equal(value, state[f"captioner.{key}"]), key


def test_pretraining_checkpoint_reports_keys_that_do_not_fit_by_name(parts, tmp_path, caplog):
    model = make_model(parts)
    path = tmp_path / "model.safetensors"
    save_model(model, str(path))  # what a pretraining checkpoint holds
    retrieval = build_single_stream(
        Config(SINGLE), feat_dim=16, vocab_size=len(parts.tokenizer), pad_id=0
    )
    with pytest.raises(CheckpointError, match=r"unexpected keys: .*captioner\..*mlm\.transform"):
        load_weights(retrieval, path)
    with caplog.at_level(logging.WARNING):
        load_weights(retrieval, path, strict=False)
    assert "mrm.regressor.weight" in caplog.text and "captioner.predictor.weight" in caplog.text
    assert torch.equal(
        retrieval.encoder.bert.pooler.dense.weight,
        model.state_dict()["encoder.bert.pooler.dense.weight"],
    )

    save_model(retrieval, str(tmp_path / "retrieval.safetensors"))  # the other way round
    with pytest.raises(CheckpointError, match=r"missing keys: .*mlm\.transform\.dense\.weight"):
        load_weights(make_model(parts), tmp_path / "retrieval.safetensors")


def test_mismatched_sizes_are_an_error_not_a_silent_skip(parts, tmp_path):
    paths = export_finetune_weights(make_model(parts), tmp_path, targets=("retrieval",))
    wider = build_single_stream(
        Config({**SINGLE, "hidden": 48, "intermediate": 96}),
        feat_dim=16, vocab_size=len(parts.tokenizer), pad_id=0,
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_weights(wider, paths["retrieval"], strict=False)


def test_understanding_stream_starts_from_a_local_bert_directory(parts, tmp_path):
    config = BertConfig(
        vocab_size=len(parts.tokenizer), hidden_size=32, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=64,
    )  # fmt: skip
    torch.manual_seed(5)
    BertModel(config).save_pretrained(str(tmp_path / "bert"))
    model = make_model(parts, bert_dir=str(tmp_path / "bert"))
    saved = BertModel.from_pretrained(str(tmp_path / "bert"), local_files_only=True).state_dict()
    for key, value in model.encoder.bert.state_dict().items():
        assert torch.equal(value, saved[key]), key


def test_pair_counts_count_right_and_total_per_pair():
    mlm = torch.zeros(2, 3, 4)
    mlm[:, :, 1] = 1.0  # always predicts word 1
    caption = torch.zeros(2, 2, 5)
    caption[:, :, 2] = 1.0  # always predicts word 2
    regions = torch.zeros(2, 2, 3)
    regions[:, :, 0] = 1.0  # always class 0
    out = {
        "mlm_logits": mlm,
        "caption_logits": caption,
        "region_logits": regions,
        "itm_logits": torch.tensor([1.0, -1.0, -2.0, 3.0]),  # pairs 0, 1 then negatives 0, 1
    }
    batch = {
        "input_ids": torch.zeros(2, 3, dtype=torch.long),
        "mlm_labels": torch.tensor([[1, IGNORE_INDEX, 0], [IGNORE_INDEX] * 3]),
        "caption_target": torch.tensor([[2, 2], [2, IGNORE_INDEX]]),
        "region_picked": torch.tensor([[True, False], [True, True]]),
        "cls_prob": torch.tensor([[[0.9, 0.1, 0], [0, 1, 0]], [[0, 1, 0], [1, 0, 0]]]),
    }
    counts = pair_counts(out, batch).tolist()
    assert count_names(out, 2) == ["mlm_acc", "caption_acc", "mrm_acc", "itm_acc"]
    assert counts == [[1, 2, 2, 2, 1, 1, 2, 2], [0, 0, 1, 1, 1, 2, 0, 2]]
