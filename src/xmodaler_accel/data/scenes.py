"""Synthetic scenes: 2-4 shapes on a 3x3 grid plus background regions, and their captions.

A scene is sampled from a numpy Generator; everything else (boxes, captions) follows from the
scene and the same Generator, so a seed fixes the whole split. Captions are plain lower-case
English from several templates (synonyms, word order, relations, counts), each grounded in the
scene, so a captioner must read the regions to do well and a constant caption scores low.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross", "heart", "hexagon")
PLURAL = {"cross": "crosses"}
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black", "pink", "brown")
SIZE_WORDS = (("small", "little", "tiny"), ("medium", "medium sized"), ("large", "big", "huge"))
BACKGROUND_KINDS = 3
BACKGROUND_LABEL = 0  # region class 0 is background, shapes are 1..len(SHAPES)
NUMBERS = ("zero", "one", "two", "three", "four")
IMAGE_SIZE = 480
_HALF_SIZE = (0.06, 0.10, 0.15)  # half box side per size class, in image units
POSITIONS = {
    (0, 0): ("in the top left corner", "at the top left"),
    (0, 1): ("at the top", "in the top middle"),
    (0, 2): ("in the top right corner", "at the top right"),
    (1, 0): ("on the left", "on the left side"),
    (1, 1): ("in the center", "in the middle"),
    (1, 2): ("on the right", "on the right side"),
    (2, 0): ("in the bottom left corner", "at the bottom left"),
    (2, 1): ("at the bottom", "in the bottom middle"),
    (2, 2): ("in the bottom right corner", "at the bottom right"),
}
RELATIONS = {
    "left": ("to the left of", "left of"),
    "right": ("to the right of", "right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}


@dataclass(frozen=True)
class SceneObject:
    shape: int
    colour: int
    size: int
    cell: int  # row * 3 + column

    @property
    def row_col(self) -> tuple[int, int]:
        return divmod(self.cell, 3)


@dataclass
class Scene:
    """Objects plus the image's regions in storage order (objects and backgrounds shuffled)."""

    objects: list[SceneObject]
    region_objects: list[int]  # per region: index into objects, or -1 for background
    region_backgrounds: list[int]  # per region: background kind, or -1 for an object
    boxes: np.ndarray  # (num_regions, 5) normalised x1, y1, x2, y2, area

    def region_of(self, obj: int) -> int:
        return self.region_objects.index(obj)

    @property
    def region_labels(self) -> list[int]:
        return [
            BACKGROUND_LABEL if o < 0 else self.objects[o].shape + 1 for o in self.region_objects
        ]

    @property
    def region_names(self) -> list[str]:
        return [
            "background" if o < 0 else SHAPES[self.objects[o].shape] for o in self.region_objects
        ]


def _object_box(obj: SceneObject, rng: np.random.Generator) -> list[float]:
    row, col = obj.row_col
    cx, cy = (col + 0.5) / 3 + rng.uniform(-0.04, 0.04), (row + 0.5) / 3 + rng.uniform(-0.04, 0.04)
    half = _HALF_SIZE[obj.size] * rng.uniform(0.9, 1.1)
    return [max(cx - half, 0.0), max(cy - half, 0.0), min(cx + half, 1.0), min(cy + half, 1.0)]


def _background_box(rng: np.random.Generator) -> list[float]:
    w, h = rng.uniform(0.3, 0.9, size=2)
    x, y = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
    return [x, y, x + w, y + h]


def sample_scene(rng: np.random.Generator, max_background: int = 3) -> Scene:
    """2-4 objects in distinct cells and 1..max_background background regions, shuffled."""
    num_objects = int(rng.integers(2, 5))
    cells = rng.choice(9, size=num_objects, replace=False)
    objects = [
        SceneObject(
            int(rng.integers(len(SHAPES))),
            int(rng.integers(len(COLOURS))),
            int(rng.integers(3)),
            int(c),
        )
        for c in cells
    ]
    num_background = int(rng.integers(1, max_background + 1)) if max_background > 0 else 0
    kinds = rng.integers(BACKGROUND_KINDS, size=num_background)
    entries = [(i, -1) for i in range(num_objects)] + [(-1, int(k)) for k in kinds]
    order = rng.permutation(len(entries))
    entries = [entries[i] for i in order]
    boxes = np.array(
        [_object_box(objects[o], rng) if o >= 0 else _background_box(rng) for o, _ in entries],
        dtype=np.float32,
    )
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return Scene(
        objects,
        [o for o, _ in entries],
        [k for _, k in entries],
        np.concatenate([boxes, area[:, None]], axis=1),
    )


# ----------------------------------------------------------------------------- phrases
def pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def with_article(words: list[str]) -> list[str]:
    return ["an" if words[0][0] in "aeiou" else "a", *words]


def noun(obj: SceneObject, rng: np.random.Generator, size: bool = True) -> list[str]:
    """'a large red circle' (or without the size)."""
    words = [COLOURS[obj.colour], SHAPES[obj.shape]]
    if size:
        words = pick(rng, SIZE_WORDS[obj.size]).split() + words
    return with_article(words)


def position(obj: SceneObject, rng: np.random.Generator) -> list[str]:
    return pick(rng, POSITIONS[obj.row_col]).split()


def relation(a: SceneObject, b: SceneObject) -> str:
    """Where a is relative to b: vertical difference first, then horizontal."""
    (ra, ca), (rb, cb) = a.row_col, b.row_col
    if ra != rb:
        return "above" if ra < rb else "below"
    return "left" if ca < cb else "right"


def plural(shape: str) -> str:
    return PLURAL.get(shape, shape + "s")


def count_phrase(count: int, noun_word: str) -> list[str]:
    return [NUMBERS[count], noun_word if count == 1 else plural(noun_word)]


# ----------------------------------------------------------------------------- templates
def _two(scene: Scene, rng: np.random.Generator) -> tuple[SceneObject, SceneObject]:
    i, j = rng.choice(len(scene.objects), size=2, replace=False)
    return scene.objects[int(i)], scene.objects[int(j)]


def t_relation(scene: Scene, rng: np.random.Generator) -> list[str]:
    a, b = _two(scene, rng)
    return noun(a, rng) + pick(rng, RELATIONS[relation(a, b)]).split() + noun(b, rng)


def t_relation_sentence(scene: Scene, rng: np.random.Generator) -> list[str]:
    a, b = _two(scene, rng)
    rel = pick(rng, RELATIONS[relation(a, b)]).split()
    return noun(a, rng, size=bool(rng.integers(2))) + ["is", *rel] + noun(b, rng, size=False)


def t_positions(scene: Scene, rng: np.random.Generator) -> list[str]:
    a, b = _two(scene, rng)
    words = ["there", "is", *noun(a, rng), *position(a, rng)]
    if rng.integers(2):
        words += ["and", *noun(b, rng), *position(b, rng)]
    return words


def t_enumerate(scene: Scene, rng: np.random.Generator) -> list[str]:
    opener = pick(rng, ("a picture of", "an image of", "an image showing", "a picture with"))
    parts = [noun(o, rng, size=False) for o in sorted(scene.objects, key=lambda o: o.cell)]
    words = opener.split()
    for k, part in enumerate(parts):
        words += (["and"] if k == len(parts) - 1 else []) + part
    return words


def t_count(scene: Scene, rng: np.random.Generator) -> list[str]:
    # Counts always come with a grounded detail: a bare "there are three shapes" fits so many
    # images that a constant caption would score well.
    words = ["there", "are", *count_phrase(len(scene.objects), pick(rng, ("shape", "object")))]
    a = scene.objects[int(rng.integers(len(scene.objects)))]
    return words + ["and", "one", "of", "them", "is", *noun(a, rng)]


def t_count_colour(scene: Scene, rng: np.random.Generator) -> list[str]:
    colours = [o.colour for o in scene.objects]
    top = max(set(colours), key=lambda c: (colours.count(c), -c))
    k = colours.count(top)
    if k == 1:  # name the colours, in grid order
        names = [COLOURS[o.colour] for o in sorted(scene.objects, key=lambda o: o.cell)]
        return [*count_phrase(len(colours), "shape"), "in", *names[:-1], "and", names[-1]]
    words = [NUMBERS[k], COLOURS[top], "shapes"]
    rest = len(colours) - k
    return words + (
        ["and", NUMBERS[rest], "other", "shape" if rest == 1 else "shapes"] if rest else []
    )


def t_largest(scene: Scene, rng: np.random.Generator) -> list[str]:
    sizes = [o.size for o in scene.objects]
    if sizes.count(max(sizes)) > 1:
        return t_positions(scene, rng)
    big = scene.objects[sizes.index(max(sizes))]
    word = pick(rng, ("largest", "biggest"))
    return ["the", word, "shape", "is", *noun(big, rng, size=False), *position(big, rng)]


def t_shape_counts(scene: Scene, rng: np.random.Generator) -> list[str]:
    ordered = sorted(scene.objects, key=lambda o: o.cell)
    shapes = list(dict.fromkeys(SHAPES[o.shape] for o in ordered))
    counts = [sum(SHAPES[o.shape] == name for o in ordered) for name in shapes]
    words: list[str] = []
    for k, (name, count) in enumerate(zip(shapes, counts)):
        if k and k == len(shapes) - 1:
            words.append("and")
        words += with_article([name]) if count == 1 else [NUMBERS[count], plural(name)]
    return words


def t_next_to(scene: Scene, rng: np.random.Generator) -> list[str]:
    pairs = [
        (a, b)
        for a in scene.objects
        for b in scene.objects
        if abs(a.row_col[0] - b.row_col[0]) + abs(a.row_col[1] - b.row_col[1]) == 1
    ]
    if not pairs:
        return t_relation(scene, rng)
    a, b = pairs[int(rng.integers(len(pairs)))]
    return noun(a, rng) + pick(rng, ("next to", "beside")).split() + noun(b, rng, size=False)


TEMPLATES = (
    t_relation,
    t_relation_sentence,
    t_positions,
    t_enumerate,
    t_count,
    t_count_colour,
    t_largest,
    t_shape_counts,
    t_next_to,
)


def captions_for(
    scene: Scene, rng: np.random.Generator, num: int = 5
) -> tuple[list[str], list[str]]:
    """`num` captions from distinct templates: (normalised lower-case, raw sentence-cased)."""
    chosen = rng.choice(len(TEMPLATES), size=num, replace=num > len(TEMPLATES))
    normalised = [" ".join(TEMPLATES[int(t)](scene, rng)) for t in chosen]
    raw = [text[0].upper() + text[1:] + "." for text in normalised]
    return normalised, raw
