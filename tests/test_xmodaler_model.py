"""X-modaler's own Transformer captioner, loaded into ours: the same outputs on the same inputs.

`fixtures/xmodaler_transformer` holds a tiny X-modaler `TransformerEncoderDecoder` (d128, 2+2
layers, vocab 101) trained 30 steps by X-modaler's trainer, its inputs and its eval-mode outputs
(see that folder's README). Our model comes from `recipes/coco.yaml` sized like it, through
`captioner_from_config` and `model.weights`, as a user would load an X-modaler checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from datasets import Array2D, Features
from safetensors.torch import load_file

from conftest import FIXTURES, REPO
from xmodaler_accel.checkpoint import CheckpointError, load_weights
from xmodaler_accel.decoding import beam_search, greedy
from xmodaler_accel.masking import IGNORE_INDEX
from xmodaler_accel.models import label_smoothed_loss
from xmodaler_accel.port.weights import XMODALER_POSITIONS, XmodalerWeightsError
from xmodaler_accel.tasks.captioning import captioner_from_config, load_caption_config

FIXTURE = FIXTURES / "xmodaler_transformer"
MAX_LEN = 20
# The fixture's sizes; VISUAL_EMBED.LOCATION_SIZE 0 (no box layer) is use_boxes false.
SIZES = {
    "d_model": 128,
    "num_encoder_layers": 2,
    "num_decoder_layers": 2,
    "ffn_dim": 512,
    "use_boxes": False,
}


class XmodalerVocab:
    """X-modaler's vocabulary as `captioner_from_config` sees it: 101 ids, and `load_vocab`'s
    '.' (id 0) is BOS, EOS and padding."""

    bos_token_id = eos_token_id = pad_token_id = 0

    def __len__(self) -> int:
        return 101


REGIONS = SimpleNamespace(features=Features({"features": Array2D((None, 2048), "float32")}))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE / "inputs.safetensors")


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE / "outputs.safetensors")


@pytest.fixture(scope="module")
def coco_yaml(tmp_path_factory) -> Path:
    """recipes/coco.yaml (X-modaler's transformer.yaml settings) sized like the fixture."""
    cfg = yaml.safe_load((REPO / "recipes" / "coco.yaml").read_text())
    cfg["model"]["transformer"].update(SIZES)
    path = tmp_path_factory.mktemp("config") / "coco_tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def build(coco_yaml) -> Callable[..., torch.nn.Module]:
    def build(*overrides: str) -> torch.nn.Module:
        cfg = load_caption_config(coco_yaml, overrides)
        return captioner_from_config(cfg, XmodalerVocab(), REGIONS).eval()

    return build


@pytest.fixture(scope="module")
def model(build) -> torch.nn.Module:
    return build(f"model.weights={FIXTURE / 'model.pth'}")


def regions(inputs: dict[str, torch.Tensor], masked: bool) -> tuple[torch.Tensor, ...]:
    """(features, boxes, mask) of the plain or the masked-regions batch (README: rebuild it)."""
    if not masked:
        return inputs["att_feats"], inputs["att_feats_loc"], inputs["att_masks"] > 0
    features = torch.zeros_like(inputs["att_feats"])
    for b, kept in enumerate(inputs["masked_num_boxes"].tolist()):
        features[b, 0] = inputs["masked_att_feats_global"][b]
        features[b, 1 : kept + 1] = inputs["att_feats"][b, 1 : kept + 1]
    return features, inputs["masked_att_feats_loc"], inputs["masked_att_masks"] > 0


def to_max_len(x: torch.Tensor) -> torch.Tensor:
    """Our decodes stop when every row has ended; X-modaler's run MAX_LEN steps, 0 after EOS."""
    return torch.nn.functional.pad(x, (0, MAX_LEN - x.shape[-1]))


def max_diff(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    assert ours.shape == theirs.shape
    return (ours - theirs).abs().max().item()


@pytest.mark.parametrize("masked", [False, True], ids=["all_regions", "masked_regions"])
def test_teacher_forced_logits_equal_xmodalers(model, inputs, expected, masked):
    prefix = "masked_" if masked else ""
    with torch.no_grad():
        logits = model(*regions(inputs, masked), inputs["g_tokens_ids"], seq_per_img=5)
    assert max_diff(logits, expected[f"{prefix}tf_logits"]) <= 1e-4
    # Our loss is X-modaler's KL plus the smoothed target's constant entropy.
    targets = inputs["g_target_ids"].masked_fill(inputs["g_target_ids"] < 0, IGNORE_INDEX)
    smooth = torch.full((101,), 0.1 / 100).index_fill(0, torch.tensor([0]), 0.9)
    entropy = -(smooth * smooth.log()).sum()
    loss = label_smoothed_loss(logits, targets, smoothing=0.1) - entropy
    assert abs(loss.item() - expected[f"{prefix}tf_label_smoothing_loss"].item()) <= 1e-5


def test_embeddings_and_encoder_equal_xmodalers(model, inputs, expected):
    features, boxes, mask = regions(inputs, masked=False)
    with torch.no_grad():
        visual = model.visual_embed(features, boxes)
        encoded = model.encode(features, boxes, mask).memory
        tokens = model.token_embed(inputs["g_tokens_ids"])
    assert max_diff(visual, expected["debug_visual_embed"]) <= 1e-5
    assert max_diff(encoded, expected["debug_encoder_out"]) <= 1e-5
    assert max_diff(tokens, expected["debug_token_embed"]) <= 1e-5


@pytest.mark.parametrize("masked", [False, True], ids=["all_regions", "masked_regions"])
def test_greedy_decode_equals_xmodalers(model, inputs, expected, masked):
    prefix = "masked_" if masked else ""
    with torch.no_grad():
        out = greedy(model, model.encode(*regions(inputs, masked)), max_len=MAX_LEN)
    assert torch.equal(to_max_len(out.tokens), expected[f"{prefix}greedy_ids"])
    assert max_diff(to_max_len(out.log_probs), expected[f"{prefix}greedy_logp"]) <= 1e-4


@pytest.mark.parametrize(
    ("beam_size", "masked"), [(2, False), (3, False), (3, True)], ids=["2", "3", "3_masked"]
)
def test_beam_search_equals_xmodalers(model, inputs, expected, beam_size, masked):
    """All beams best first, per-token log-probs (0 after EOS) and unnormalised summed scores."""
    key = f"{'masked_' if masked else ''}beam{beam_size}"
    with torch.no_grad():
        out = beam_search(
            model, model.encode(*regions(inputs, masked)), beam_size=beam_size, max_len=MAX_LEN
        )
    assert torch.equal(to_max_len(out.beams), expected[f"{key}_ids"])
    assert torch.equal(out.sequences, out.beams[:, 0])  # what the evaluator gets
    assert max_diff(to_max_len(out.token_log_probs), expected[f"{key}_logp"]) <= 1e-4
    assert max_diff(out.beam_scores, expected[f"{key}_scores"]) <= 1e-4


def test_xmodaler_checkpoint_file_loads_like_its_state_dict(build, model, tmp_path):
    """X-modaler's trainer writes {"model": state_dict, "trainer": ..., "iteration": ...}."""
    state = torch.load(FIXTURE / "model.pth", weights_only=True)
    path = tmp_path / "model_final.pth"
    torch.save({"model": state, "trainer": {"iteration": 29}, "iteration": 29}, path)
    other = build()
    load_weights(other, path)
    theirs = other.state_dict()
    assert all(torch.equal(value, theirs[name]) for name, value in model.state_dict().items())


def save_changed(tmp_path, change) -> str:
    state = torch.load(FIXTURE / "model.pth", weights_only=True)
    change(state)
    path = tmp_path / "changed.pth"
    torch.save(state, path)
    return str(path)


def test_unmapped_and_missing_xmodaler_keys_are_named_in_the_error(build, tmp_path, caplog):
    def change(state):
        state["decoder.g_layers.2.x_att.self.query.weight"] = torch.zeros(128, 128)  # 3rd layer
        del state["decoder.g_layers.1.x_att.self.key.bias"]  # half of our fused key_value

    path = save_changed(tmp_path, change)
    with pytest.raises(CheckpointError) as error:
        load_weights(build(), path)
    message = str(error.value)
    assert "unexpected keys: decoder.g_layers.1.x_att.self.value.bias" in message
    assert "decoder.g_layers.2.x_att.self.query.weight" in message
    assert "missing keys: decoder_layers.1.cross_attn.key_value.bias" in message
    with caplog.at_level(logging.WARNING):
        load_weights(build(), path, strict=False)
    assert "decoder.g_layers.2.x_att.self.query.weight" in caplog.text


def test_xmodaler_boxes_layer_needs_use_boxes(build, tmp_path):
    """VISUAL_EMBED.LOCATION_SIZE 5 saves `visual_embed.embeddings_pos`: ours is use_boxes."""

    def change(state):
        state["visual_embed.embeddings_pos.weight"] = torch.randn(128, 5)
        state["visual_embed.embeddings_pos.bias"] = torch.randn(128)

    path = save_changed(tmp_path, change)
    with pytest.raises(CheckpointError, match="visual_embed.embeddings_pos.weight"):
        load_weights(build(), path)
    with_boxes = build("model.transformer.use_boxes=true")
    load_weights(with_boxes, path)
    state = torch.load(path, weights_only=True)
    assert torch.equal(
        with_boxes.visual_embed.boxes.weight, state["visual_embed.embeddings_pos.weight"]
    )


def test_a_sinusoid_table_other_than_ours_is_refused(build, tmp_path):
    """X-modaler's base is 2 * POSITION_MAX_LEN; we compute base 10000 (its default 5000)."""

    def change(state):
        state[XMODALER_POSITIONS] = state[XMODALER_POSITIONS][:, :100] * 1.01

    with pytest.raises(XmodalerWeightsError, match=XMODALER_POSITIONS):
        load_weights(build(), save_changed(tmp_path, change))


# X-modaler's Up-Down (base_att_image_caption.yaml + updown.yaml) at small sizes: there is no
# recorded fixture, so the reference is its forward pass transcribed from X-modaler's source
# (VisualBaseEmbedding, TokenBaseEmbedding with ReLU, UpDownEncoder, UpDownDecoder, BaseAttention,
# BasePredictor; eval mode), run on an X-modaler-named state dict.
UPDOWN = {"hidden_size": 32, "embed_dim": 24, "visual_dim": 28, "att_size": 16}


def xmodaler_updown_state(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    hidden, embed, visual, att = (UPDOWN[k] for k in UPDOWN)
    shapes = {
        "token_embed.embeddings.weight": (101, embed),
        "visual_embed.embeddings.weight": (visual, 2048),
        "visual_embed.embeddings.bias": (visual,),
        "decoder.lstm1.weight_ih": (4 * hidden, hidden + embed + visual),
        "decoder.lstm1.weight_hh": (4 * hidden, hidden),
        "decoder.lstm1.bias_ih": (4 * hidden,),
        "decoder.lstm1.bias_hh": (4 * hidden,),
        "decoder.lstm2.weight_ih": (4 * hidden, hidden + visual),
        "decoder.lstm2.weight_hh": (4 * hidden, hidden),
        "decoder.lstm2.bias_ih": (4 * hidden,),
        "decoder.lstm2.bias_hh": (4 * hidden,),
        "decoder.att.w_h.weight": (att, hidden),
        "decoder.att.w_alpha.weight": (1, att),
        "decoder.p_att_feats.weight": (att, visual),
        "decoder.p_att_feats.bias": (att,),
        "predictor.logits.weight": (101, hidden),
        "predictor.logits.bias": (101,),
    }
    return {name: 0.2 * torch.randn(shape, generator=gen) for name, shape in shapes.items()}


def xmodaler_updown_logits(sd, att_feats, att_masks, tokens_ids):
    """RnnAttEncoderDecoder._forward (teacher forcing) as X-modaler computes it."""

    def linear(x, name, bias=True):
        return x @ sd[f"{name}.weight"].T + (sd[f"{name}.bias"] if bias else 0)

    def lstm(x, h, c, name):
        gates = x @ sd[f"{name}.weight_ih"].T + sd[f"{name}.bias_ih"]
        gates = gates + h @ sd[f"{name}.weight_hh"].T + sd[f"{name}.bias_hh"]
        i, f, g, o = gates.chunk(4, 1)
        c = f.sigmoid() * c + i.sigmoid() * g.tanh()
        return o.sigmoid() * c.tanh(), c

    att_feats = linear(att_feats, "visual_embed.embeddings").relu()
    ext_att_masks = (1.0 - att_masks) * -10000.0
    global_feats = (att_feats * att_masks[..., None]).sum(1) / att_masks.sum(-1)[:, None]
    p_att_feats = linear(att_feats, "decoder.p_att_feats")
    h = [att_feats.new_zeros(len(att_feats), UPDOWN["hidden_size"])] * 2
    c = list(h)
    logits = []
    for t in range(tokens_ids.shape[1]):
        wt = sd["token_embed.embeddings.weight"][tokens_ids[:, t]].relu()
        h1, c1 = lstm(torch.cat([h[1], global_feats, wt], 1), h[0], c[0], "decoder.lstm1")
        alpha = (linear(h1, "decoder.att.w_h", bias=False)[:, None] + p_att_feats).tanh()
        alpha = linear(alpha, "decoder.att.w_alpha", bias=False).squeeze(-1) + ext_att_masks
        att = torch.bmm(alpha.softmax(-1)[:, None], att_feats).squeeze(1)
        h2, c2 = lstm(torch.cat([att, h1], 1), h[1], c[1], "decoder.lstm2")
        h, c = [h1, h2], [c1, c2]
        logits.append(linear(h2, "predictor.logits"))
    return torch.stack(logits, 1)


def test_xmodaler_updown_weights_load_into_ours_and_give_its_logits(build, tmp_path, inputs):
    path = tmp_path / "updown.pth"
    state = xmodaler_updown_state()
    torch.save({"model": state}, path)
    ours = build("model.kind=updown", *(f"model.updown.{k}={v}" for k, v in UPDOWN.items()))
    load_weights(ours, path)  # strict: every key on both sides is used
    features, _, mask = regions(inputs, masked=True)
    ids = inputs["g_tokens_ids"][::5]  # one caption per image
    with torch.no_grad():
        logits = ours(features, inputs["masked_att_feats_loc"], mask, ids)
        expected = xmodaler_updown_logits(state, features, mask.float(), ids)
    assert max_diff(logits, expected) <= 1e-5
