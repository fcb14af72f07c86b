"""VCR-style items for synthetic scenes: a question, 4 answers, 4 rationales, tags to regions.

Items come out in VCR's own JSON form (tags as lists of region indices inside token lists), so
they go through the same `vcr_row` expansion as real VCR annotations. Answering needs the
regions (colour, position, counts); choosing the rationale needs them too, because wrong
rationales agree with the right answer on one fact and contradict the scene on another.
"""

from __future__ import annotations

from itertools import combinations
from typing import Any

import numpy as np

from .scenes import COLOURS, NUMBERS, POSITIONS, RELATIONS, Scene, relation

Tokens = list[Any]  # words (str) and tags (list[int])


def _shuffled(right: Tokens, wrong: list[Tokens], rng: np.random.Generator) -> tuple[list, int]:
    choices = [right, *wrong]
    order = [int(i) for i in rng.permutation(len(choices))]
    return [choices[i] for i in order], order.index(0)


def _position_words(cell: int, rng: np.random.Generator) -> list[str]:
    options = POSITIONS[divmod(cell, 3)]
    return options[int(rng.integers(len(options)))].split()


def _other(values: range, exclude: int, count: int, rng: np.random.Generator) -> list[int]:
    pool = [v for v in values if v != exclude]
    return [int(v) for v in rng.choice(pool, size=count, replace=False)]


def colour_item(scene: Scene, rng: np.random.Generator) -> dict[str, Any]:
    """'what color is [r] ?' ; rationales pair the colour with the right or a wrong position."""
    obj = int(rng.integers(len(scene.objects)))
    target, region = scene.objects[obj], scene.region_of(obj)
    wrong_colours = _other(range(len(COLOURS)), target.colour, 3, rng)
    wrong_cells = _other(range(9), target.cell, 2, rng)
    answers, answer_label = _shuffled(
        ["it", "is", COLOURS[target.colour]],
        [["it", "is", COLOURS[c]] for c in wrong_colours],
        rng,
    )

    def fact(colour: int, cell: int) -> Tokens:
        return [[region], "is", COLOURS[colour], "and", "it", "is", *_position_words(cell, rng)]

    rationales, rationale_label = _shuffled(
        fact(target.colour, target.cell),
        [
            fact(target.colour, wrong_cells[0]),
            fact(wrong_colours[0], target.cell),
            fact(wrong_colours[1], wrong_cells[1]),
        ],
        rng,
    )
    question = ["what", "color", "is", [region], "?"]
    return _item(scene, question, answers, answer_label, rationales, rationale_label)


def position_item(scene: Scene, rng: np.random.Generator) -> dict[str, Any]:
    """'where is [r] ?' ; rationales give its relation to another object, one of them true."""
    a, b = (int(i) for i in rng.choice(len(scene.objects), size=2, replace=False))
    target, other = scene.objects[a], scene.objects[b]
    region, other_region = scene.region_of(a), scene.region_of(b)
    answers, answer_label = _shuffled(
        ["it", "is", *_position_words(target.cell, rng)],
        [["it", "is", *_position_words(c, rng)] for c in _other(range(9), target.cell, 3, rng)],
        rng,
    )
    true_rel = relation(target, other)
    phrases = {name: options[0].split() for name, options in RELATIONS.items()}
    rationales, rationale_label = _shuffled(
        [[region], "is", *phrases[true_rel], [other_region]],
        [[[region], "is", *phrases[r], [other_region]] for r in phrases if r != true_rel],
        rng,
    )
    question = ["where", "is", [region], "?"]
    return _item(scene, question, answers, answer_label, rationales, rationale_label)


def count_item(scene: Scene, rng: np.random.Generator) -> dict[str, Any]:
    """'how many red shapes are there ?' ; rationales name which regions are red."""
    colour = scene.objects[int(rng.integers(len(scene.objects)))].colour
    right = tuple(
        sorted(scene.region_of(i) for i, o in enumerate(scene.objects) if o.colour == colour)
    )
    count = len(right)

    def answer(n: int) -> Tokens:
        return ["there", "is", "one"] if n == 1 else ["there", "are", NUMBERS[n]]

    answers, answer_label = _shuffled(
        answer(count), [answer(n) for n in range(1, 5) if n != count], rng
    )

    def fact(regions: tuple[int, ...]) -> Tokens:
        if len(regions) == 1:
            return ["only", [regions[0]], "is", COLOURS[colour]]
        return [list(regions), "are", "the", COLOURS[colour], "shapes"]

    pool = range(len(scene.region_objects))
    subsets = [s for k in (1, 2, 3) for s in combinations(pool, k) if s != right]
    picks = rng.choice(len(subsets), size=3, replace=False)
    rationales, rationale_label = _shuffled(
        fact(right), [fact(subsets[int(i)]) for i in picks], rng
    )
    question = ["how", "many", COLOURS[colour], "shapes", "are", "there", "?"]
    return _item(scene, question, answers, answer_label, rationales, rationale_label)


def _item(
    scene: Scene,
    question: Tokens,
    answers: list[Tokens],
    answer_label: int,
    rationales: list[Tokens],
    rationale_label: int,
) -> dict[str, Any]:
    return {
        "question": question,
        "answer_choices": answers,
        "rationale_choices": rationales,
        "answer_label": answer_label,
        "rationale_label": rationale_label,
        "objects": scene.region_names,
    }


ITEM_MAKERS = (colour_item, position_item, count_item)


def vcr_item(scene: Scene, rng: np.random.Generator) -> dict[str, Any]:
    """One VCR-style item of a random kind (colour, position or count) about `scene`."""
    return ITEM_MAKERS[int(rng.integers(len(ITEM_MAKERS)))](scene, rng)
