"""X-modaler YAML configs (captioning: Transformer, Up-Down; XE and RL) to our recipe YAML.

`python -m xmodaler_accel.port config transformer.yaml [--rl transformer_rl.yaml]`: the file and
its `_BASE_` chain are merged as X-modaler does (its defaults, then the base, then the child),
each key is mapped to ours, and every X-modaler key that has no counterpart is named with why.
An RL config (ENGINE.NAME RLTrainer...) becomes the `rl:` section and a `scst:` section holding
the keys whose value differs from the XE config (its own `_BASE_`, or the one given with --rl).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import ConfigError, deep_update, flatten

# Where X-modaler's epoch counts go. X-modaler counts SOLVER.EPOCH, EVAL_PERIOD and
# CHECKPOINT_PERIOD in epochs of floor(images / TRAIN_BATCH_SIZE) steps (drop_last=True).
# Default: the epoch keys (our engine derives steps from the dataset size and global batch);
# with --train-images N: the step keys, computed here for one process.
EPOCH_KEYS = {
    "SOLVER.EPOCH": "train.epochs",
    "SOLVER.EVAL_PERIOD": "eval.every_epochs",
    "SOLVER.CHECKPOINT_PERIOD": "checkpoint.every_epochs",
    "LR_SCHEDULER.STEP_SIZE": "lr_scheduler.step_size_epochs",  # StepLR: epochs in X-modaler
}
STEP_KEYS = {
    "SOLVER.EPOCH": "train.max_steps",
    "SOLVER.EVAL_PERIOD": "eval.every",
    "SOLVER.CHECKPOINT_PERIOD": "checkpoint.every",
    "LR_SCHEDULER.STEP_SIZE": "lr_scheduler.step_size",  # StepLR: epochs in X-modaler
}

# X-modaler's defaults (xmodaler/config/defaults.py, UpDownDecoder.add_config) for the keys read
# below, so that a key a file leaves out means what it means in X-modaler.
XMODALER_DEFAULTS: dict[str, Any] = {
    "DATASETS.TRAIN": "", "DATASETS.VAL": "", "DATASETS.TEST": "",
    "DATALOADER.TRAIN_BATCH_SIZE": 64, "DATALOADER.TEST_BATCH_SIZE": 64,
    "DATALOADER.NUM_WORKERS": 4, "DATALOADER.SEQ_PER_SAMPLE": 5, "DATALOADER.MAX_FEAT_NUM": -1,
    "DATALOADER.FEATS_FOLDER": "", "DATALOADER.ANNO_FOLDER": "",
    "ENGINE.NAME": "DefaultTrainer",
    "SCHEDULED_SAMPLING.START_EPOCH": 0, "SCHEDULED_SAMPLING.INC_EVERY_EPOCH": 5,
    "SCHEDULED_SAMPLING.INC_PROB": 0.05, "SCHEDULED_SAMPLING.MAX_PROB": 0.25,
    "MODEL.META_ARCHITECTURE": "", "MODEL.ENCODER": "", "MODEL.DECODER": "",
    "MODEL.ENCODER_DIM": 1024, "MODEL.DECODER_DIM": 1024, "MODEL.PRED_DROPOUT": 0.0,
    "MODEL.PREDICTOR": "", "MODEL.MAX_SEQ_LEN": 17, "MODEL.WEIGHTS": "",
    "MODEL.USE_EMA": False, "MODEL.EMA_DECAY": 0.9999,
    "MODEL.TOKEN_EMBED.NAME": "", "MODEL.TOKEN_EMBED.DIM": 1024,
    "MODEL.TOKEN_EMBED.ACTIVATION": "none", "MODEL.TOKEN_EMBED.USE_NORM": False,
    "MODEL.TOKEN_EMBED.DROPOUT": 0.0, "MODEL.TOKEN_EMBED.POSITION": "none",
    "MODEL.VISUAL_EMBED.NAME": "", "MODEL.VISUAL_EMBED.OUT_DIM": 1024,
    "MODEL.VISUAL_EMBED.ACTIVATION": "none", "MODEL.VISUAL_EMBED.USE_NORM": False,
    "MODEL.VISUAL_EMBED.DROPOUT": 0.0, "MODEL.VISUAL_EMBED.LOCATION_SIZE": 0,
    "MODEL.BERT.HIDDEN_SIZE": 512, "MODEL.BERT.HIDDEN_DROPOUT_PROB": 0.1,
    "MODEL.BERT.HIDDEN_ACT": "gelu", "MODEL.BERT.NUM_ATTENTION_HEADS": 8,
    "MODEL.BERT.INTERMEDIATE_SIZE": 2048, "MODEL.BERT.INTERMEDIATE_DROP": 0.1,
    "MODEL.BERT.FFN_DROPOUT_PROB": 0.1, "MODEL.BERT.ATTENTION_PROBS_DROPOUT_PROB": 0.1,
    "MODEL.BERT.NUM_HIDDEN_LAYERS": 12, "MODEL.BERT.NUM_GENERATION_LAYERS": 6,
    "MODEL.UPDOWN.ATT_EMBED_SIZE": 512, "MODEL.UPDOWN.DROPOUT1": 0.0,
    "MODEL.UPDOWN.DROPOUT2": 0.0, "MODEL.UPDOWN.ATT_EMBED_DROPOUT": 0.0,
    "SOLVER.NAME": "Adam", "SOLVER.EPOCH": 10, "SOLVER.CHECKPOINT_PERIOD": 1,
    "SOLVER.EVAL_PERIOD": 1, "SOLVER.BASE_LR": 0.0005, "SOLVER.BIAS_LR_FACTOR": 1.0,
    "SOLVER.WEIGHT_DECAY": 0.0, "SOLVER.WEIGHT_DECAY_NORM": 0.0, "SOLVER.WEIGHT_DECAY_BIAS": 0.0,
    "SOLVER.MOMENTUM": 0.9, "SOLVER.DAMPENING": 0.0, "SOLVER.NESTEROV": 0.0,
    "SOLVER.BETAS": [0.9, 0.999], "SOLVER.EPS": 1e-8, "SOLVER.GRAD_CLIP_TYPE": "norm",
    "SOLVER.GRAD_CLIP": 0.1, "SOLVER.NORM_TYPE": 2.0, "SOLVER.WRITE_PERIOD": 20,
    "LR_SCHEDULER.NAME": "StepLR", "LR_SCHEDULER.STEP_SIZE": 3, "LR_SCHEDULER.GAMMA": 0.1,
    "LR_SCHEDULER.MODEL_SIZE": -1, "LR_SCHEDULER.FACTOR": 1.0, "LR_SCHEDULER.WARMUP": 0,
    "LOSSES.NAMES": [""], "LOSSES.LABELSMOOTHING": 0.1,
    "SCORER.TYPES": [""], "SCORER.WEIGHTS": [1.0],
    "DECODE_STRATEGY.NAME": "BeamSearcher", "DECODE_STRATEGY.BEAM_SIZE": 1,
    "INFERENCE.VOCAB": "", "INFERENCE.VAL_ANNFILE": "", "INFERENCE.TEST_ANNFILE": "",
    "INFERENCE.VAL_EVAL_START": -1, "INFERENCE.TEST_EVAL_START": -1,
    "OUTPUT_DIR": "./output", "SEED": -1,
}  # fmt: skip

# What each captioner of ours implements: X-modaler values it takes as given (any other value
# is reported), by model.kind, then for every kind.
ARCHITECTURES = {
    ("TransformerEncoderDecoder", "TransformerEncoder", "TransformerDecoder"): "transformer",
    ("RnnAttEncoderDecoder", "UpDownEncoder", "UpDownDecoder"): "updown",
}
BUILT_IN: dict[str, dict[str, Any]] = {
    "transformer": {
        "MODEL.TOKEN_EMBED.ACTIVATION": "none", "MODEL.TOKEN_EMBED.USE_NORM": True,
        "MODEL.TOKEN_EMBED.POSITION": "SinusoidEncoding", "MODEL.VISUAL_EMBED.USE_NORM": True,
        "MODEL.BERT.HIDDEN_ACT": "relu",
    },
    "updown": {
        "MODEL.TOKEN_EMBED.ACTIVATION": "relu", "MODEL.TOKEN_EMBED.USE_NORM": False,
        "MODEL.TOKEN_EMBED.POSITION": "none", "MODEL.VISUAL_EMBED.USE_NORM": False,
        "MODEL.UPDOWN.ATT_EMBED_DROPOUT": 0.0,
    },
    "*": {
        "MODEL.PREDICTOR": "BasePredictor", "MODEL.TOKEN_EMBED.NAME": "TokenBaseEmbedding",
        "MODEL.VISUAL_EMBED.NAME": "VisualBaseEmbedding", "MODEL.VISUAL_EMBED.ACTIVATION": "relu",
        "SOLVER.BIAS_LR_FACTOR": 1.0, "SOLVER.WEIGHT_DECAY_NORM": 0.0,
        "SOLVER.WEIGHT_DECAY_BIAS": 0.0, "SOLVER.DAMPENING": 0.0, "SOLVER.NESTEROV": 0.0,
        "DECODE_STRATEGY.NAME": "BeamSearcher", "SCORER.NAME": "BaseScorer", "SCORER.EOS_ID": 0,
        "INFERENCE.NAME": "COCOEvaler", "INFERENCE.ID_KEY": "image_id",
        "INFERENCE.VALUE": "caption", "INFERENCE.GENERATION_MODE": True,
        "INFERENCE.VAL_EVAL_START": -1, "INFERENCE.TEST_EVAL_START": -1,
    },
}  # fmt: skip

# Keys whose information reaches us another way (any value is fine).
ELSEWHERE = {
    "MODEL.DEVICE": "Accelerate places the model (accelerate launch / CUDA_VISIBLE_DEVICES)",
    "MODEL.VOCAB_SIZE": "the dataset's tokenizer",
    "MODEL.VISUAL_EMBED.IN_DIM": "the dataset's feature width",
    "MODEL.TOKEN_EMBED.POSITION_MAX_LEN": "computed sinusoid table",
    "DATALOADER.ANNO_FOLDER": "the data conversion command",
    "DATALOADER.FEATS_FOLDER": "the data conversion command",
    "INFERENCE.VOCAB": "the data conversion command",
    "INFERENCE.VAL_ANNFILE": "the data conversion command (raw references)",
    "INFERENCE.TEST_ANNFILE": "the data conversion command (raw references)",
    "SCORER.GT_PATH": "built from the training captions",
    "SCORER.CIDER_CACHED": "built from the training captions",
    "CUDNN_BENCHMARK": "the launcher",
    "VERSION": "-",
}
RL_ENGINES = {  # ENGINE.NAME -> (rl.sampler, rl.baseline)
    "RLTrainer": ("sample", "greedy"),
    "RLBeamTrainer": ("beam", "mean"),
    "RLMeanTrainer": ("sample", "leave_one_out"),
}
OPTIMIZERS = {"Adam": "adam", "AdamW": "adamw", "SGD": "sgd"}
SCORERS = {"Cider": "rl.cider_weight", "Bleu": "rl.bleu_weight"}
METRICS = ["bleu", "meteor", "rouge", "cider"]  # COCOEvaler (SPICE: see README)


@dataclass
class Conversion:
    """Our config (nested), each our-key's X-modaler source, and the X-modaler keys not mapped."""

    config: dict[str, Any]
    sources: dict[str, str] = field(default_factory=dict)
    unmapped: dict[str, str] = field(default_factory=dict)  # "KEY = value" -> why
    files: list[str] = field(default_factory=list)
    data_command: str = ""


def read_xmodaler_yaml(path: str | Path, _stack: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The file merged over its `_BASE_` chain (detectron2's CfgNode: base first, child wins;
    a relative `_BASE_` is relative to the file's folder)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"X-modaler config {path}: no such file")
    if path.resolve() in _stack:
        raise ConfigError(f"X-modaler config {path}: _BASE_ cycle")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        message = " ".join(str(err).split())
        raise ConfigError(f"X-modaler config {path}: invalid YAML ({message})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"X-modaler config {path}: top level is not a mapping")
    base = data.pop("_BASE_", None)
    if base is None:
        return data
    base_path = Path(str(base)).expanduser()
    if not base_path.is_absolute():
        base_path = path.parent / base_path
    merged = read_xmodaler_yaml(base_path, (*_stack, path.resolve()))
    deep_update(merged, data)
    return merged


def _set(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


# Keys without a counterpart whose X-modaler default leaves the feature off or unused by the
# captioners above (other tasks' datasets and losses, other optimizers' and schedulers' options,
# layer drop): a resolved config (X-modaler's OUTPUT_DIR/config.yaml) lists them all, and at these
# values they ask for nothing. Any other value is reported. Defaults as X-modaler ed1f559 writes.
INERT_DEFAULTS: dict[str, Any] = {
    "DATALOADER.ATTRIBUTE_FILE": "", "DATALOADER.GV_FEAT_FILE": "",
    "DATALOADER.RELATION_FILE": "", "DATALOADER.FILE_PATHS": [], "DATALOADER.SAMPLE_IDS": [],
    "DATALOADER.SAMPLE_PROB": 0.2, "DATALOADER.INF_BATCH_SIZE": 200,
    "DATALOADER.NEGATIVE_SIZE": -1, "DATALOADER.USE_GLOBAL_V": True,
    "LOSSES.MARGIN": 0.2, "LOSSES.MAX_VIOLATION": True,
    "LR_SCHEDULER.MIN_LR": 1e-05, "LR_SCHEDULER.STEPS": [3],
    "LR_SCHEDULER.WARMUP_FACTOR": 0.0, "LR_SCHEDULER.WARMUP_METHOD": "linear",
    "MODEL.BERT.LAYER_DROP": 0.0, "MODEL.BERT.G_LAYER_DROP": 0.0,
    "MODEL.BERT.U_LAYER_DROP": 0.0, "MODEL.BERT.V_LAYER_DROP": 0.0,
    "MODEL.BERT.NUM_UNDERSTANDING_LAYERS": 6, "MODEL.BERT.V_NUM_HIDDEN_LAYERS": 6,
    "MODEL.BERT.V_TARGET_SIZE": 0, "MODEL.ENSEMBLE_WEIGHTS": [""], "MODEL.ITM_NEG_PROB": 0.5,
    "MODEL.MODEL_WEIGHTS": [1.0, 1.0], "MODEL.V_PREDICTOR": "",
    "MODEL.PRETRAINING.DO_LOWER_CASE": True,
    "MODEL.PRETRAINING.FROM_PRETRAINED": "bert-base-uncased",
    "MODEL.PRETRAINING.MODEL_NAME": "bert-base-uncased",
    "MODEL.TOKEN_EMBED.ELU_ALPHA": 0.5, "MODEL.TOKEN_EMBED.TYPE_VOCAB_SIZE": 0,
    "MODEL.VISUAL_EMBED.ELU_ALPHA": 0.5, "MODEL.VISUAL_EMBED.G_IN_DIM": 512,
    "SOLVER.ALPHA": 0.99, "SOLVER.AMSGRAD": False, "SOLVER.CENTERED": False,
    "SOLVER.INITIAL_ACCUMULATOR_VALUE": 0.0, "SOLVER.LR_DECAY": 0.0,
}  # fmt: skip


class _Mapper:
    """Reads X-modaler keys, writes ours, and remembers which given keys found no home."""

    def __init__(self, given: dict[str, Any]) -> None:
        self.given = given
        self.values = {**XMODALER_DEFAULTS, **given}
        self.used: set[str] = set()
        self.out = Conversion(config={})

    def get(self, key: str) -> Any:
        self.used.add(key)
        return self.values.get(key)

    def put(self, ours: str, value: Any, *keys: str) -> None:
        _set(self.out.config, ours, value)
        if keys:
            self.out.sources[ours] = " / ".join(keys)

    def reject(self, key: str, why: str) -> None:
        self.used.add(key)
        if key in self.values:
            default = "" if key in self.given else " (X-modaler default)"
            self.out.unmapped[f"{key} = {self.values[key]!r}{default}"] = why

    def built_in(self, key: str, expected: Any, what: str) -> None:
        value = self.get(key)
        if key in self.values and value != expected:
            self.reject(key, f"{what} implements {expected!r} only")

    def same(self, ours: str, keys: list[str], what: str) -> None:
        """Several X-modaler keys that ours holds as one value: the first wins, others must agree."""
        value = self.get(keys[0])
        self.put(ours, value, *keys)
        for key in keys[1:]:
            if self.get(key) != value:
                self.reject(key, f"differs from {keys[0]} = {value!r}; ours has one {what}")

    def finish(self) -> Conversion:
        for key, value in self.given.items():
            inert = key in INERT_DEFAULTS and value == INERT_DEFAULTS[key]
            if key not in self.used and key not in ELSEWHERE and not inert:
                self.out.unmapped[f"{key} = {value!r}"] = "no counterpart"
        return self.out


def _translate(given: dict[str, Any], name: str, steps_per_epoch: int | None) -> Conversion:
    m = _Mapper(given)
    m.put("output_dir", m.get("OUTPUT_DIR") if "OUTPUT_DIR" in given else f"output/{name}")
    if "SEED" in given:
        if m.values["SEED"] >= 0:
            m.put("seed", m.get("SEED"), "SEED")
        else:
            m.reject("SEED", "X-modaler draws a seed when < 0; ours keeps its default")
    m.put("train.batch_size", m.get("DATALOADER.TRAIN_BATCH_SIZE"), "DATALOADER.TRAIN_BATCH_SIZE")
    m.put("train.num_workers", m.get("DATALOADER.NUM_WORKERS"), "DATALOADER.NUM_WORKERS")
    m.put("train.log_every", m.get("SOLVER.WRITE_PERIOD"), "SOLVER.WRITE_PERIOD")
    clip = m.get("SOLVER.GRAD_CLIP_TYPE")
    if clip in ("value", "norm"):
        m.put("train.clip_grad.mode", clip, "SOLVER.GRAD_CLIP_TYPE")
        m.put("train.clip_grad.max", float(m.get("SOLVER.GRAD_CLIP")), "SOLVER.GRAD_CLIP")
        if clip == "norm":
            m.built_in("SOLVER.NORM_TYPE", 2.0, "clip_grad.mode norm")
        m.get("SOLVER.NORM_TYPE")
    else:
        m.reject("SOLVER.GRAD_CLIP_TYPE", "ours clips by value or norm")
    ss = {"start_epoch": "START_EPOCH", "every": "INC_EVERY_EPOCH", "prob": "INC_PROB",
          "max_prob": "MAX_PROB"}  # fmt: skip
    for ours, key in ss.items():
        m.put(f"train.scheduled_sampling.{ours}", m.get(f"SCHEDULED_SAMPLING.{key}"),
              f"SCHEDULED_SAMPLING.{key}")  # fmt: skip
    if m.values["MODEL.META_ARCHITECTURE"] == "TransformerEncoderDecoder":
        # X-modaler's hook sets SS_PROB, but only RnnAttEncoderDecoder reads it: its Transformer
        # trains with teacher forcing alone. Ours would mix in predictions: turned off.
        m.put("train.scheduled_sampling.max_prob", 0.0,
              "0: TransformerEncoderDecoder ignores SCHEDULED_SAMPLING")  # fmt: skip
    if m.get("MODEL.USE_EMA"):
        m.put("train.ema_decay", float(m.get("MODEL.EMA_DECAY")), "MODEL.USE_EMA", "EMA_DECAY")
    m.get("MODEL.EMA_DECAY")

    # Epoch counts: see EPOCH_KEYS / STEP_KEYS.
    for key in ("SOLVER.EPOCH", "SOLVER.EVAL_PERIOD", "SOLVER.CHECKPOINT_PERIOD"):
        epochs = m.get(key)
        if steps_per_epoch:
            m.put(STEP_KEYS[key], epochs * steps_per_epoch, key)
        else:
            m.put(EPOCH_KEYS[key], epochs, key)

    _optimizer(m, steps_per_epoch)
    _model(m)

    # Evaluation, decoding, data.
    m.put("eval.batch_size", m.get("DATALOADER.TEST_BATCH_SIZE"), "DATALOADER.TEST_BATCH_SIZE")
    splits = [s for s in ("val", "test") if m.get(f"DATASETS.{s.upper()}")]
    m.put("eval.splits", splits, "DATASETS.VAL", "DATASETS.TEST")
    m.put("eval.metrics", list(METRICS), "INFERENCE.NAME")
    beam = m.get("DECODE_STRATEGY.BEAM_SIZE")
    m.put("decode.beam_size", beam, "DECODE_STRATEGY.BEAM_SIZE")
    m.put("decode.max_len", m.get("MODEL.MAX_SEQ_LEN"), "MODEL.MAX_SEQ_LEN")
    for split in ("TRAIN", "VAL", "TEST"):
        if m.get(f"DATASETS.{split}") not in ("", "MSCoCoDataset"):
            m.reject(f"DATASETS.{split}", "ours converts MSCoCoDataset's files only")
    anno = str(m.get("DATALOADER.ANNO_FOLDER") or "xmodaler_dataset")
    m.put("data.source", f"data/{Path(anno).name}", "DATALOADER.ANNO_FOLDER")
    # MSCoCoDataset reads MAX_FEAT_NUM - 1 regions (features with boxes) and puts their mean first.
    feats = m.get("DATALOADER.MAX_FEAT_NUM")
    m.put("data.max_feat_num", feats - 1 if feats > 0 else feats, "DATALOADER.MAX_FEAT_NUM")
    m.put("data.use_global_v", True, "MSCoCoDataset: the regions' mean first")
    m.put("data.seq_per_img", m.get("DATALOADER.SEQ_PER_SAMPLE"), "DATALOADER.SEQ_PER_SAMPLE")
    m.put("data.max_seq_len", m.get("MODEL.MAX_SEQ_LEN"), "MODEL.MAX_SEQ_LEN")
    # Every split with its COCO-format references (scored raw, as COCOEvaler), evaluated or not.
    annfiles = {s: m.values.get(f"INFERENCE.{s.upper()}_ANNFILE") for s in ("val", "test")}
    references = " ".join(f"{split}={path}" for split, path in annfiles.items() if path)
    m.out.data_command = (
        f"python -m xmodaler_accel.data.convert xmodaler --annotations {anno} "
        f"--features {m.values['DATALOADER.FEATS_FOLDER']} --vocab {m.values['INFERENCE.VOCAB']} "
        + (f"--references {references} " if references else "")
        + f"--output {m.out.config['data']['source']}"
    )
    weights = str(m.get("MODEL.WEIGHTS") or "")
    if weights.startswith("{"):
        m.reject(
            "MODEL.WEIGHTS",
            "a placeholder; give model.weights=<checkpoint> (SCST: the newest XE one)",
        )
    elif weights:
        m.put("model.weights", weights, "MODEL.WEIGHTS")

    # The self-critical step.
    engine = m.get("ENGINE.NAME")
    if engine in RL_ENGINES:
        sampler, baseline = RL_ENGINES[engine]
        m.put("rl.sampler", sampler, "ENGINE.NAME")
        m.put("rl.baseline", baseline, "ENGINE.NAME")
        m.put(
            "rl.samples_per_image",
            m.values["DATALOADER.SEQ_PER_SAMPLE"],
            "DATALOADER.SEQ_PER_SAMPLE",
        )
        weights = dict(zip(m.get("SCORER.TYPES"), m.get("SCORER.WEIGHTS"), strict=False))
        for scorer, ours in SCORERS.items():
            m.put(ours, float(weights.pop(scorer, 0.0)), "SCORER.TYPES", "SCORER.WEIGHTS")
        if weights:
            m.reject("SCORER.TYPES", f"ours rewards Cider and Bleu only, not {sorted(weights)}")
    elif engine != "DefaultTrainer":
        m.reject("ENGINE.NAME", "ours converts DefaultTrainer and RL(Beam|Mean)Trainer")
    else:  # read by the RL trainers only
        m.get("SCORER.TYPES"), m.get("SCORER.WEIGHTS")
    for key, value in BUILT_IN["*"].items():
        m.built_in(key, value, "ours")
    return m.finish()


def _optimizer(m: _Mapper, steps_per_epoch: int | None) -> None:
    name = m.get("SOLVER.NAME")
    if name in OPTIMIZERS:
        m.put("optim.name", OPTIMIZERS[name], "SOLVER.NAME")
    else:
        m.reject("SOLVER.NAME", f"ours has {sorted(OPTIMIZERS)}")
    scheduler = m.get("LR_SCHEDULER.NAME")
    for key in ("MODEL_SIZE", "FACTOR", "WARMUP", "STEP_SIZE", "GAMMA"):
        m.get(f"LR_SCHEDULER.{key}")  # X-modaler's schedulers ignore the others' keys too
    if scheduler == "NoamLR":  # ours multiplies optim.lr by Noam's factor: 1.0 reproduces it
        m.put("optim.lr", 1.0, "LR_SCHEDULER.NAME")
        m.reject("SOLVER.BASE_LR", "X-modaler's NoamLR ignores it (optim.lr 1.0 reproduces NoamLR)")
    else:
        m.put("optim.lr", float(m.get("SOLVER.BASE_LR")), "SOLVER.BASE_LR")
    m.put("optim.betas", list(m.get("SOLVER.BETAS")), "SOLVER.BETAS")
    m.put("optim.eps", float(m.get("SOLVER.EPS")), "SOLVER.EPS")
    m.put("optim.weight_decay", float(m.get("SOLVER.WEIGHT_DECAY")), "SOLVER.WEIGHT_DECAY")
    if name == "SGD":
        m.put("optim.momentum", float(m.get("SOLVER.MOMENTUM")), "SOLVER.MOMENTUM")
    m.get("SOLVER.MOMENTUM")
    if scheduler == "NoamLR":
        m.put("lr_scheduler.name", "noam", "LR_SCHEDULER.NAME")
        for ours, key in (
            ("model_size", "MODEL_SIZE"),
            ("factor", "FACTOR"),
            ("warmup_steps", "WARMUP"),
        ):
            m.put(f"lr_scheduler.{ours}", m.get(f"LR_SCHEDULER.{key}"), f"LR_SCHEDULER.{key}")
    elif scheduler == "FixLR":
        m.put("lr_scheduler.name", "constant", "LR_SCHEDULER.NAME")
        m.put("lr_scheduler.warmup_steps", 0, "LR_SCHEDULER.NAME")
    elif scheduler == "StepLR":
        m.put("lr_scheduler.name", "step", "LR_SCHEDULER.NAME")
        m.put("lr_scheduler.gamma", float(m.get("LR_SCHEDULER.GAMMA")), "LR_SCHEDULER.GAMMA")
        epochs = m.get("LR_SCHEDULER.STEP_SIZE")
        if steps_per_epoch:
            step = epochs * steps_per_epoch
            m.put(STEP_KEYS["LR_SCHEDULER.STEP_SIZE"], step, "LR_SCHEDULER.STEP_SIZE")
        else:
            m.put(EPOCH_KEYS["LR_SCHEDULER.STEP_SIZE"], epochs, "LR_SCHEDULER.STEP_SIZE")
    else:
        m.reject("LR_SCHEDULER.NAME", "ours converts NoamLR, FixLR and StepLR")


def _model(m: _Mapper) -> None:
    arch = tuple(m.get(f"MODEL.{k}") for k in ("META_ARCHITECTURE", "ENCODER", "DECODER"))
    kind = ARCHITECTURES.get(arch)
    if kind is None:
        for key in ("META_ARCHITECTURE", "ENCODER", "DECODER"):
            m.reject(f"MODEL.{key}", f"ours builds {sorted(ARCHITECTURES.values())} only")
        return
    m.put("model.kind", kind, "MODEL.META_ARCHITECTURE", "ENCODER", "DECODER")
    losses = m.get("LOSSES.NAMES")
    if losses == ["LabelSmoothing"]:
        m.put(
            "model.label_smoothing", float(m.get("LOSSES.LABELSMOOTHING")), "LOSSES.LABELSMOOTHING"
        )
    elif losses == ["CrossEntropy"]:
        m.put("model.label_smoothing", 0.0, "LOSSES.NAMES")
    else:
        m.reject("LOSSES.NAMES", "ours trains LabelSmoothing or CrossEntropy")
    m.get("LOSSES.LABELSMOOTHING")
    p = f"model.{kind}"
    if kind == "transformer":
        m.same(f"{p}.d_model", ["MODEL.BERT.HIDDEN_SIZE", "MODEL.ENCODER_DIM", "MODEL.DECODER_DIM",
               "MODEL.TOKEN_EMBED.DIM", "MODEL.VISUAL_EMBED.OUT_DIM"], "width")  # fmt: skip
        m.put(f"{p}.num_heads", m.get("MODEL.BERT.NUM_ATTENTION_HEADS"), "BERT.NUM_ATTENTION_HEADS")
        m.put(
            f"{p}.num_encoder_layers",
            m.get("MODEL.BERT.NUM_HIDDEN_LAYERS"),
            "BERT.NUM_HIDDEN_LAYERS",
        )
        m.put(f"{p}.num_decoder_layers", m.get("MODEL.BERT.NUM_GENERATION_LAYERS"),
              "BERT.NUM_GENERATION_LAYERS")  # fmt: skip
        m.put(f"{p}.ffn_dim", m.get("MODEL.BERT.INTERMEDIATE_SIZE"), "BERT.INTERMEDIATE_SIZE")
        m.same(f"{p}.dropout", ["MODEL.BERT.HIDDEN_DROPOUT_PROB", "MODEL.TOKEN_EMBED.DROPOUT",
               "MODEL.BERT.ATTENTION_PROBS_DROPOUT_PROB", "MODEL.BERT.INTERMEDIATE_DROP",
               "MODEL.BERT.FFN_DROPOUT_PROB"], "Transformer dropout")  # fmt: skip
        m.put(f"{p}.visual_dropout", m.get("MODEL.VISUAL_EMBED.DROPOUT"), "VISUAL_EMBED.DROPOUT")
        m.put(f"{p}.tie_embeddings", False, "MODEL.PREDICTOR")
    else:
        m.put(f"{p}.hidden_size", m.get("MODEL.DECODER_DIM"), "MODEL.DECODER_DIM")
        m.put(f"{p}.embed_dim", m.get("MODEL.TOKEN_EMBED.DIM"), "TOKEN_EMBED.DIM")
        m.put(f"{p}.visual_dim", m.get("MODEL.VISUAL_EMBED.OUT_DIM"), "VISUAL_EMBED.OUT_DIM")
        m.put(f"{p}.att_size", m.get("MODEL.UPDOWN.ATT_EMBED_SIZE"), "UPDOWN.ATT_EMBED_SIZE")
        m.same(f"{p}.dropout", ["MODEL.TOKEN_EMBED.DROPOUT", "MODEL.VISUAL_EMBED.DROPOUT"],
               "embedding dropout")  # fmt: skip
        m.same(f"{p}.lstm_dropout", ["MODEL.UPDOWN.DROPOUT1", "MODEL.UPDOWN.DROPOUT2"],
               "LSTM dropout")  # fmt: skip
        m.get("MODEL.ENCODER_DIM")  # UpDownEncoder does not read it
    m.put(f"{p}.pred_dropout", m.get("MODEL.PRED_DROPOUT"), "MODEL.PRED_DROPOUT")
    m.put(
        f"{p}.use_boxes",
        m.get("MODEL.VISUAL_EMBED.LOCATION_SIZE") > 0,
        "VISUAL_EMBED.LOCATION_SIZE",
    )
    for key, value in BUILT_IN[kind].items():
        m.built_in(key, value, f"model.kind {kind}")


def _is_rl(given: dict[str, Any]) -> bool:
    return given.get("ENGINE.NAME") in RL_ENGINES


def _diff(new: dict, old: dict) -> dict:
    out = {}
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(old.get(key), dict):
            sub = _diff(value, old[key])
            if sub:
                out[key] = sub
        elif old.get(key) != value:
            out[key] = copy.deepcopy(value)
    return out


def convert_config(
    path: str | Path,
    *,
    rl: str | Path | None = None,
    train_images: int | None = None,
    world_size: int = 1,
) -> Conversion:
    """Our config from an X-modaler config (and its RL config: the `rl:` and `scst:` sections).

    An RL config given alone takes its `_BASE_` chain as the XE config. `train_images` gives
    step counts instead of epoch counts (steps per epoch as X-modaler's loader:
    floor(ceil(images / world_size) / TRAIN_BATCH_SIZE)).
    """
    path = Path(path)
    top = read_xmodaler_yaml(path)
    xe_path, rl_path, given = path, None, flatten(top)
    if rl is not None:
        rl_path = Path(rl)
    elif _is_rl(given) and (base := (yaml.safe_load(path.read_text()) or {}).get("_BASE_")):
        rl_path, xe_path = path, path.parent / str(base)
        given = flatten(read_xmodaler_yaml(xe_path))

    def steps(values: dict[str, Any]) -> int | None:
        if not train_images:
            return None
        batch = values.get(
            "DATALOADER.TRAIN_BATCH_SIZE", XMODALER_DEFAULTS["DATALOADER.TRAIN_BATCH_SIZE"]
        )
        return math.ceil(train_images / world_size) // batch

    out = _translate(given, xe_path.stem, steps(given))
    out.files = [str(xe_path)]
    if rl_path is not None:
        rl_given = flatten(read_xmodaler_yaml(rl_path))
        scst = _translate(rl_given, rl_path.stem, steps(rl_given))
        out.files.append(str(rl_path))
        out.config["rl"] = scst.config.pop("rl", {})
        out.sources.update({k: v for k, v in scst.sources.items() if k.startswith("rl.")})
        out.sources.update({f"scst.{k}": f"{rl_path.name} {v}" for k, v in scst.sources.items()})
        section = _diff(scst.config, {k: v for k, v in out.config.items() if k != "rl"})
        out.config["scst"] = section
        for key, why in scst.unmapped.items():
            if key not in out.unmapped:
                out.unmapped[f"{key} [{rl_path.name}]"] = why
    return out


def _flow(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=1_000_000).strip()
    return text.removesuffix("...").strip()


def _emit(node: dict, sources: dict[str, str], prefix: str, indent: int, lines: list[str]) -> None:
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        pad = "  " * indent
        if isinstance(value, dict) and value:
            lines.append(f"{pad}{key}:")
            _emit(value, sources, f"{dotted}.", indent + 1, lines)
        else:
            line = f"{pad}{key}: {_flow(value)}"
            source = sources.get(dotted)
            lines.append(f"{line:<48} # {source}" if source else line)


def render(conversion: Conversion) -> str:
    """Our YAML, each key commented with its X-modaler source, the unmapped keys at the end."""
    lines = [
        f"# Converted from X-modaler {' + '.join(conversion.files)}",
        "# by python -m xmodaler_accel.port config.",
    ]
    if conversion.data_command:
        lines += ["# Data: convert X-modaler's files once:", f"#   {conversion.data_command}"]
    _emit(conversion.config, conversion.sources, "", 0, lines)
    if conversion.unmapped:
        lines.append("# X-modaler keys not mapped:")
        lines += [f"#   {key}: {why}" for key, why in conversion.unmapped.items()]
    return "\n".join(lines) + "\n"
