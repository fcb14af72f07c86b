"""Caption metrics equal coco-caption's (pycocoevalcap): always on the checked-in caption fixture
(tests/fixtures/captions), and on the Flickr8k test split where ../shared/data/flickr8k exists."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass

import pytest

from conftest import CAPTIONS_FIXTURE, FLICKR8K, SOURCES
from xmodaler_accel.metrics import SPICE_UNAVAILABLE, score_captions, tokenize_lines
from xmodaler_accel.metrics import meteor as meteor_module
from xmodaler_accel.metrics.rouge import lcs_length

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="java is not installed")
TOL = 1e-6

# Raw captions in the styles people and models write (not pre-tokenised like Flickr8k).
RAW_CAPTIONS = [
    "A man's dog isn't running; it can't, won't and cannot run!",
    "The dogs' owners said \"hello\" to the 'kids' (and the cat) [maybe] {yes}.",
    "A t-shirt costs $5.50 or \u00a33 or 1,000 dollars at 3:30 p.m. on 12/25/2013 & more.",
    "Mr. Smith and Dr. Jones went to the U.S. with St. Louis fans etc.",
    "He's gonna wanna gotta lemme gimme do it -- now - ok?!",
    "It's 50% off... and/or 3*4 = twelve; e.g. here.",
    "A woman holding an umbrella.A man.",
    "A 10.5-inch pizza, 1/2 off, 3 1/2 cups, 12-3, 3:00pm.",
    "caf\u00e9 na\u00efve \u201cfancy\u201d quotes \u2014 dash \u2026 end \u2019s",
    "A letter A.",
    "The group of people. A boy in a red shirt.",
    "Red racing ol' car on track ... blowing smoke mid-air.;",
    "",
    "...",
]


def _flickr8k(split: str) -> dict[str, list[str]]:
    """Captions of one split: {image: [5 captions]}."""
    captions: dict[str, list[str]] = {}
    for line in (FLICKR8K / "Flickr8k.token.txt").read_text(encoding="utf8").splitlines():
        key, caption = line.split("\t")
        captions.setdefault(key.split("#")[0], []).append(caption)
    names = (FLICKR8K / f"Flickr_8k.{split}Images.txt").read_text().split()
    return {name: captions[name] for name in names if name in captions}


@dataclass(frozen=True)
class Captions:
    """An image set's reference captions and written candidates (none for Flickr8k)."""

    references: dict[str, list[str]]
    candidates: dict[str, list[str]]


def _fixture_captions() -> Captions:
    """The checked-in fixture (make_captions.py): 1-7 references, 1-3 candidates per image."""
    images = json.loads(CAPTIONS_FIXTURE.read_text(encoding="utf8"))["images"]
    assert len(images) >= 100
    return Captions(
        {x["image"]: x["references"] for x in images},
        {x["image"]: x["candidates"] for x in images},
    )


@pytest.fixture(scope="module", params=SOURCES)
def captions(request) -> Captions:
    if request.param == "flickr8k":
        return Captions(_flickr8k("test"), {})
    return _fixture_captions()


def _candidates(data: Captions, mode: str) -> tuple[dict, dict]:
    """Candidates and their references under the same keys: each written candidate against its
    image's references (Flickr8k: each image's first caption against its other four); with
    "shuffled", each key's candidate is that of another (shuffled) key instead."""
    if data.candidates:
        pairs = [(f"{i}#{k}", i, c) for i, cs in data.candidates.items() for k, c in enumerate(cs)]
        own = {key: c for key, _, c in pairs}
        refs = {key: data.references[i] for key, i, _ in pairs}
    else:
        own = {i: caps[0] for i, caps in data.references.items()}
        refs = {i: caps[1:] for i, caps in data.references.items()}
    keys = list(own)
    donors = keys[:]
    random.Random(0).shuffle(donors)
    pick = dict(zip(keys, donors)) if mode == "shuffled" else {k: k for k in keys}
    return {k: own[pick[k]] for k in keys}, refs


def _coco_caption(preds: dict, refs: dict, with_meteor: bool = False) -> dict[str, float]:
    """pycocoevalcap's own pipeline: Java PTB tokeniser, then its scorers."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gts = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
    res = PTBTokenizer().tokenize({k: [{"caption": v}] for k, v in preds.items()})
    if with_meteor:
        return {"METEOR": Meteor().compute_score(gts, res)[0]}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out = {f"Bleu_{k + 1}": b for k, b in enumerate(bleu)}
    out["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
    out["CIDEr"] = Cider().compute_score(gts, res)[0]
    return out


@needs_java
def test_ptb_tokenizer_matches_coco_caption_token_for_token(captions):
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    written = [c for caps in captions.candidates.values() for c in caps]
    lines = [c for caps in captions.references.values() for c in caps] + written + RAW_CAPTIONS
    java = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(lines)})
    ours = tokenize_lines(lines)
    mismatches = [(c, java[i][0], ours[i]) for i, c in enumerate(lines) if java[i][0] != ours[i]]
    assert not mismatches, mismatches[:5]
    assert len(lines) >= 5 * len(captions.references)


@needs_java
@pytest.mark.parametrize("mode", ["own", "shuffled"])
def test_bleu_rouge_cider_equal_coco_caption(captions, mode):
    pytest.importorskip("pycocoevalcap")
    preds, refs = _candidates(captions, mode)
    ours = score_captions(preds, refs, ("bleu", "rouge", "cider"))
    theirs = _coco_caption(preds, refs)
    assert list(ours) == ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"]
    for name, value in theirs.items():
        assert ours[name] == pytest.approx(value, abs=TOL), name


@needs_java
def test_edge_captions_equal_coco_caption(captions):
    pytest.importorskip("pycocoevalcap")
    references = captions.references
    images = list(references)[:60]
    odd = ["", ".", "a a a a a a dog dog dog", " ".join(references[images[0]]), "The  END!!"]
    preds = {
        i: (odd[k] if k < len(odd) else RAW_CAPTIONS[k % len(RAW_CAPTIONS)])
        for k, i in enumerate(images)
    }
    refs = {i: references[i] for i in images}
    ours = score_captions(preds, refs, ("bleu", "rouge", "cider"))
    for name, value in _coco_caption(preds, refs).items():
        assert ours[name] == pytest.approx(value, abs=TOL), name


def _meteor_pairs(data: Captions) -> tuple[dict, dict]:
    """The fixture's written candidates (unrelated ones among them); Flickr8k's first 200
    images, alternately their first caption and a shuffled image's."""
    own, refs = _candidates(data, "own")
    if data.candidates:
        return own, refs
    shuffled, _ = _candidates(data, "shuffled")
    keys = list(refs)[:200]
    preds = {i: (own[i] if k % 2 else shuffled[i]) for k, i in enumerate(keys)}
    return preds, {i: refs[i] for i in keys}


@needs_java
def test_meteor_equals_coco_caption(captions):
    pytest.importorskip("pycocoevalcap")
    preds, refs = _meteor_pairs(captions)
    ours = score_captions(preds, refs, ("meteor",))
    assert ours["METEOR"] == pytest.approx(_coco_caption(preds, refs, True)["METEOR"], abs=TOL)


def test_meteor_without_java_names_the_problem(monkeypatch):
    monkeypatch.setattr(meteor_module.shutil, "which", lambda _: None)
    with pytest.raises(meteor_module.MeteorUnavailable, match="needs Java"):
        score_captions({1: "a dog"}, {1: ["a dog runs"]}, ("meteor",))


def test_spice_is_reported_unavailable_without_failing_the_evaluation():
    with pytest.warns(RuntimeWarning, match="SPICE unavailable"):
        scores = score_captions({1: "a dog runs"}, {1: ["a dog runs", "a cat"]}, ("cider", "spice"))
    assert "SPICE" not in scores and "CIDEr" in scores
    assert SPICE_UNAVAILABLE.startswith("SPICE unavailable")


def test_mismatched_image_ids_are_named():
    with pytest.raises(ValueError, match="same image ids"):
        score_captions({1: "a dog"}, {2: ["a dog"]}, ("bleu",))
    with pytest.raises(ValueError, match="unknown caption metric"):
        score_captions({1: "a dog"}, {1: ["a dog"]}, ("bluee",))


def test_bit_parallel_lcs_equals_dynamic_programming():
    rng = random.Random(1)

    def dp(a, b):
        table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
        for i in range(1, len(a) + 1):
            for j in range(1, len(b) + 1):
                same = a[i - 1] == b[j - 1]
                table[i][j] = (
                    table[i - 1][j - 1] + 1 if same else max(table[i - 1][j], table[i][j - 1])
                )
        return table[-1][-1]

    for _ in range(300):
        a = [rng.choice("abcde") for _ in range(rng.randrange(0, 80))]
        b = [rng.choice("abcde") for _ in range(rng.randrange(0, 30))]
        assert lcs_length(a, b) == dp(a, b)


def test_evaluate_modules_load_offline_from_package_files():
    pytest.importorskip("evaluate")
    preds = ["A dog runs on the grass.", "a man", ""]
    refs = [["A dog is running on grass .", "the dog runs"], ["a man walks", "A person ."], ["x"]]
    script = (
        "import json, sys\n"
        "from xmodaler_accel.metrics import load_caption_metric\n"
        "p, r = json.loads(sys.argv[1])\n"
        "out = {n: load_caption_metric(n).compute(predictions=p, references=r)\n"
        "       for n in ('caption_bleu', 'caption_rouge', 'caption_cider')}\n"
        "out['coco'] = load_caption_metric().compute(predictions=p, references=r,\n"
        "                                            metrics=['bleu', 'rouge', 'cider'])\n"
        "print(json.dumps(out))\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_EVALUATE_OFFLINE="1")
    run = subprocess.run(
        [sys.executable, "-c", script, json.dumps([preds, refs])],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    loaded = json.loads(run.stdout.strip().splitlines()[-1])
    expected = score_captions(
        dict(enumerate(preds)), dict(enumerate(refs)), ("bleu", "rouge", "cider")
    )
    assert loaded["coco"] == pytest.approx(expected, abs=1e-12)
    merged = {**loaded["caption_bleu"], **loaded["caption_rouge"], **loaded["caption_cider"]}
    assert merged == pytest.approx(expected, abs=1e-12)


@needs_java
def test_evaluator_scores_against_raw_references_as_coco_caption(captions):
    """The captioning evaluator scores against the references as written (PTB-tokenised by
    score_captions), so its numbers equal coco-caption's on raw references; the normalised
    `captions` column would not ("t-shirt", "man 's", "cannot" are normalised differently)."""
    pytest.importorskip("pycocoevalcap")
    from datasets import Dataset

    from xmodaler_accel.data.converters import normalise_caption
    from xmodaler_accel.tasks.captioning.evaluation import reference_captions

    preds, raw_refs = _candidates(captions, "own")
    ids = {name: k for k, name in enumerate(raw_refs)}
    table = Dataset.from_dict(
        {
            "image_id": list(ids.values()),
            "captions": [[normalise_caption(c, name) for c in raw_refs[name]] for name in ids],
            "raw_captions": [raw_refs[name] for name in ids],
        }
    )
    refs = dict(zip(table["image_id"], reference_captions(table)))
    by_id = {ids[name]: caption for name, caption in preds.items()}
    ours = score_captions(by_id, refs, ("bleu", "cider"))
    theirs = _coco_caption(preds, raw_refs)
    for name in ("Bleu_1", "Bleu_4", "CIDEr"):
        assert ours[name] == pytest.approx(theirs[name], abs=TOL), name
    normalised = dict(zip(table["image_id"], table["captions"]))
    off = score_captions(by_id, normalised, ("bleu", "cider"))
    assert off["Bleu_4"] != pytest.approx(theirs["Bleu_4"], abs=TOL)
    assert off["CIDEr"] != pytest.approx(theirs["CIDEr"], abs=TOL)
