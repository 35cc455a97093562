"""Regenerate the shipped sample data: data/prompts.txt (SD-style prompts) and data/images/*.png.

Deterministic (seeded); everything is generated here, nothing is copied from elsewhere.
    python data/make_sample.py
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

HERE = Path(__file__).parent
SUBJECTS = [
    "a lighthouse on a cliff", "a red fox in the snow", "an astronaut riding a horse", "a cyberpunk street market",
    "a cozy cabin in the woods", "a portrait of an old fisherman", "a dragon sleeping on gold", "a bowl of ramen",
    "a steampunk airship", "a samurai under cherry blossoms", "a cat wearing a wizard hat", "a futuristic city skyline",
    "a medieval castle at dusk", "a jellyfish in deep water", "a robot reading a book", "a field of sunflowers",
    "an owl on a branch", "a desert caravan", "a floating island with waterfalls", "a vintage car in the rain",
    "a greek temple ruin", "a knight fighting a giant crab", "a tiny house made of candy", "a glass chess set",
    "a portrait of a queen made of flowers", "a lonely tree on a hill", "a submarine exploring a coral reef",
    "a bustling tokyo alley at night", "a wolf howling at the moon", "an ancient library with floating books",
    "a mountain lake at sunrise", "a corgi astronaut", "a haunted victorian mansion", "a bonsai tree in a teacup",
    "a viking ship in a storm", "a neon-lit diner", "a cathedral made of ice", "a hummingbird drinking nectar",
    "a polar bear on an iceberg", "a witch brewing a potion", "a mech robot in a wheat field", "a treehouse village",
]
STYLES = [
    "digital painting", "oil on canvas", "watercolor", "concept art", "photorealistic", "studio ghibli style",
    "pixel art", "ukiyo-e woodblock print", "charcoal sketch", "3d render", "art nouveau poster", "low poly",
    "matte painting", "comic book style", "impressionist painting", "isometric illustration",
]
ARTISTS = [
    "by greg rutkowski", "by alphonse mucha", "by makoto shinkai", "by james gurney", "by moebius",
    "by hayao miyazaki", "by ivan aivazovsky", "by thomas kinkade", "by simon stalenhag", "by zdzislaw beksinski",
    "by artgerm", "by hokusai", "",
]
MODIFIERS = [
    "highly detailed", "trending on artstation", "8k", "cinematic lighting", "volumetric fog", "sharp focus",
    "octane render", "unreal engine", "golden hour", "dramatic lighting", "intricate", "soft colors",
    "vibrant colors", "bokeh", "wide angle", "symmetrical", "masterpiece", "hdr",
]


def make_prompts(count: int = 2000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    prompts: list[str] = []
    seen: set[str] = set()
    while len(prompts) < count:
        parts = [rng.choice(SUBJECTS), rng.choice(STYLES)]
        artist = rng.choice(ARTISTS)
        if artist:
            parts.append(artist)
        parts += rng.sample(MODIFIERS, rng.randint(0, 5))
        prompt = ", ".join(parts)
        if prompt not in seen:
            seen.add(prompt)
            prompts.append(prompt)
    return prompts


def make_images(folder: Path, count: int = 6, size: int = 256, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for number in range(count):
        top, bottom = rng.integers(0, 256, size=(2, 3))
        ramp = np.linspace(0, 1, size)[:, None, None]
        pixels = (top * (1 - ramp) + bottom * ramp).repeat(size, axis=1).astype(np.uint8)
        image = Image.fromarray(pixels, "RGB")
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x0, y0 = rng.integers(0, size - 40, size=2)
            x1, y1 = x0 + rng.integers(20, 120), y0 + rng.integers(20, 120)
            colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
        image.save(folder / f"sample{number:02d}.png", optimize=True)


def make_heldout(corpus: list[str], count: int = 100, seed: int = 1) -> list[str]:
    """Prompts from the same generator that are not in the corpus: labels for text-only `eval`."""
    taken = set(corpus)
    return [prompt for prompt in make_prompts(count * 3, seed) if prompt not in taken][:count]


if __name__ == "__main__":
    prompts = make_prompts()
    (HERE / "prompts.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    import csv

    with open(HERE / "heldout.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["imgId", "prompt"])
        writer.writerows((f"heldout{number:03d}", prompt) for number, prompt in enumerate(make_heldout(prompts)))
    make_images(HERE / "images")
    print("wrote data/prompts.txt, data/heldout.csv and data/images/")
