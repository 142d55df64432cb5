"""Examples for gradio_demo.py, in IC-Light's layout: [input_path, prompt, lighting, width, height, seed].

They come from the synthetic dataset this repository ships (data/synthetic, made by eddpm/synthetic.py):
each condition PNG is an RGBA foreground, and metadata.jsonl gives its prompt and light direction
("front" light maps to lighting "None": no gradient in the initial latent). There is no output column:
no outputs are pre-rendered, so nothing large is committed. Clicking an example fills the inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data" / "synthetic"
LIGHTING_OF_DIRECTION = {"left": "Left", "right": "Right", "top": "Top", "bottom": "Bottom", "front": "None"}
NUM_EXAMPLES = 10  # the first rows cycle through the five light directions, so every lighting shows twice
WIDTH, HEIGHT, SEED = 512, 512, 12345  # square, like the 128 px foregrounds; IC-Light's default seed


def load_examples(data_dir: Path = DATA_DIR, count: int = NUM_EXAMPLES) -> list[list]:
    """The first `count` rows of `data_dir`/metadata.jsonl as examples; [] when the data is not there."""
    metadata = data_dir / "metadata.jsonl"
    if not metadata.is_file():
        return []
    examples = []
    with open(metadata) as fh:
        for line in fh:
            if len(examples) == count:
                break
            row = json.loads(line)
            path = data_dir / row["conditioning_file_name"]
            lighting = LIGHTING_OF_DIRECTION.get(row.get("light_direction"))
            if path.is_file() and lighting is not None:
                examples.append([str(path), row["text"], lighting, WIDTH, HEIGHT, SEED + len(examples)])
    return examples


examples = load_examples()
