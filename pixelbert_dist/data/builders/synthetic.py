"""A synthetic image–caption set: 1–3 coloured shapes on a plain or noisy background.

Every caption names the colour and shape of every object (with counts and left/right/
above/below relations in some phrasings), so a caption of another image almost always
disagrees with the picture: a tiny model on a CPU learns ITM in minutes. Each scene is
drawn from ``numpy.random.default_rng([seed, index])``, so the set is byte-identical for
a seed whatever the worker count, and each image carries its ``objects`` so VQA-style
questions and true/false sentences can be generated from it later.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pixelbert_dist.data.builders.common import BuildResult, Item, build_split

SOURCE = "synthetic"
COLORS = {
    "red": (220, 35, 35),
    "green": (40, 170, 60),
    "blue": (35, 80, 225),
    "yellow": (240, 210, 40),
    "purple": (140, 55, 185),
    "orange": (245, 135, 25),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star")
BACKGROUNDS = {"white": (245, 245, 245), "gray": (128, 128, 128), "black": (15, 15, 15), "noisy": (120, 120, 120)}
NUMBERS = ("zero", "one", "two", "three")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _name(obj: dict, with_size: bool = False) -> str:
    words = ([obj["size_word"]] if with_size else []) + [obj["color"], obj["shape"]]
    return f"{_article(words[0])} {' '.join(words)}"


def _join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _place(rng, width: int, height: int, count: int) -> list[tuple[int, int, int]]:
    """(x, y, size) centres/diameters of ``count`` non-overlapping shapes."""
    side = min(width, height)
    placed: list[tuple[int, int, int]] = []
    scale = 1.0
    while len(placed) < count:
        for _ in range(60):
            size = int(side * scale * rng.uniform(0.22, 0.42))
            x = int(rng.integers(size // 2 + 2, width - size // 2 - 1))
            y = int(rng.integers(size // 2 + 2, height - size // 2 - 1))
            if all(math.hypot(x - px, y - py) > (size + ps) / 2 + 3 for px, py, ps in placed):
                placed.append((x, y, size))
                break
        else:
            scale *= 0.8  # crowded: shrink the next tries rather than overlap
    return placed


def make_scene(seed: int, index: int, min_size: int = 96, max_size: int = 224) -> dict:
    rng = np.random.default_rng([seed, index])
    width, height = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
    count = int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))
    colors = rng.choice(list(COLORS), size=count, replace=False)
    shapes = rng.choice(SHAPES, size=count)
    objects = []
    for (x, y, size), color, shape in zip(_place(rng, width, height, count), colors, shapes):
        objects.append({"shape": str(shape), "color": str(color), "x": x, "y": y, "size": size})
    background = str(rng.choice(list(BACKGROUNDS)))
    return {"width": width, "height": height, "background": background, "objects": objects}


def _relation(a: dict, b: dict) -> str:
    dx, dy = b["x"] - a["x"], b["y"] - a["y"]
    if abs(dx) >= abs(dy):
        return "to the left of" if dx > 0 else "to the right of"
    return "above" if dy > 0 else "below"


def captions_for(scene: dict) -> list[str]:
    objs = scene["objects"]
    side = min(scene["width"], scene["height"])
    for obj in objs:
        obj_size = obj["size"] / side
        obj["size_word"] = "large" if obj_size >= 0.32 else "small"
    names, bg = [_name(o) for o in objs], scene["background"]
    caps = [f"{_join(names)}.", f"{_join(names)} on {_article(bg)} {bg} background."]
    if len(objs) == 1:
        caps += [
            f"there is one {objs[0]['color']} {objs[0]['shape']} in the picture.",
            f"an image of {_name(objs[0], with_size=True)}.",
        ]
    else:
        caps.append(f"there are {NUMBERS[len(objs)]} shapes: {_join(names)}.")
        a, b = objs[0], objs[1]
        rel = f"{_name(a)} {_relation(a, b)} {_name(b)}"
        caps.append(rel + (f", and {names[2]}." if len(objs) == 3 else "."))
        caps.append(
            f"the {b['color']} {b['shape']} is {_relation(b, a).replace('to the ', '')} the {a['color']} {a['shape']}."
        )
    for obj in objs:
        del obj["size_word"]
    return caps


def _polygon(shape: str, x: int, y: int, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        angles = [-90, 30, 150]
        return [(x + r * math.cos(math.radians(a)), y + r * math.sin(math.radians(a))) for a in angles]
    if shape == "diamond":
        return [(x, y - r), (x + r, y), (x, y + r), (x - r, y)]
    # star: five outer points with inner points at 0.45 r between them
    return [
        (x + rr * math.cos(math.radians(-90 + 36 * k)), y + rr * math.sin(math.radians(-90 + 36 * k)))
        for k, rr in enumerate([r, 0.45 * r] * 5)
    ]


def render_scene(scene: dict, seed: int, index: int) -> Image.Image:
    """Draw ``scene`` (runs in a worker process; deterministic for (seed, index))."""
    size = (scene["width"], scene["height"])
    base = np.array(BACKGROUNDS[scene["background"]], dtype=np.int16)
    if scene["background"] == "noisy":
        rng = np.random.default_rng([seed, index, 1])
        noise = rng.integers(-45, 46, size=(size[1], size[0], 3), dtype=np.int16)
        image = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")
    else:
        image = Image.new("RGB", size, tuple(int(v) for v in base))
    draw = ImageDraw.Draw(image)
    for obj in scene["objects"]:
        x, y, r, fill = obj["x"], obj["y"], obj["size"] / 2, COLORS[obj["color"]]
        if obj["shape"] == "circle":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
        elif obj["shape"] == "square":
            half = r * 0.85  # a square of the same visual weight as the circle
            draw.rectangle([x - half, y - half, x + half, y + half], fill=fill)
        else:
            draw.polygon(_polygon(obj["shape"], x, y, r), fill=fill)
    return image


def synthetic_items(seed: int, start: int, stop: int, min_size: int = 96, max_size: int = 224) -> list[Item]:
    items = []
    for index in range(start, stop):
        scene = make_scene(seed, index, min_size, max_size)
        items.append(
            Item(
                key=f"syn{index:08d}",
                image_id=str(index),
                source=SOURCE,
                captions=captions_for(scene),
                extra={"objects": scene["objects"], "background": scene["background"]},
                render=functools.partial(render_scene, scene, seed, index),
            )
        )
    return items


def build_synthetic(
    out_dir: str | Path,
    num: int,
    seed: int = 0,
    val_fraction: float = 0.1,
    min_size: int = 96,
    max_size: int = 224,
    samples_per_shard: int = 2000,
    workers: int = 0,
    progress: bool = True,
) -> dict[str, BuildResult]:
    """Write ``out_dir/train`` and ``out_dir/val`` (images ``num - n_val`` .. ``num`` are val)."""
    if num < 1 or not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"need num >= 1 and 0 <= val_fraction < 1 (got {num}, {val_fraction})")
    if not 16 <= min_size <= max_size:
        raise ValueError(f"need 16 <= min_size <= max_size (got {min_size}, {max_size})")
    n_val = int(round(num * val_fraction))
    splits = {"train": (0, num - n_val), "val": (num - n_val, num)}
    return {
        split: build_split(
            synthetic_items(seed, lo, hi, min_size, max_size),
            Path(out_dir) / split,
            split,
            SOURCE,
            samples_per_shard,
            workers,
            progress,
        )
        for split, (lo, hi) in splits.items()
    }
