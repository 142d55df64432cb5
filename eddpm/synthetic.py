"""A seeded generator of paired relighting examples: simple shapes under directional light.

Each example is one shape (sphere, cube, cylinder, torus, cone, capsule) with a random albedo, rendered
twice at the same pose:

- the target: shaded with Lambert diffuse + Blinn-Phong specular + a small ambient term under one light
  (from the left, right, top, bottom or front, warm/neutral/cool), over a background gradient that is
  brighter on the lit side and tinted by the light colour;
- the condition: the same object under flat, almost uniform frontal light (symmetric, so it carries no
  direction), saved as RGBA with the object's matte as alpha and gray 127 wherever alpha is 0.

Light direction convention: the direction names the side of the IMAGE the light comes from, as IC-Light's
demo does ("Left Light" = bright left). "left" means the left half of the object (as seen in the image) is
brighter; "top" means its upper half is brighter; "front" means the light sits at the camera, so the shading
is centred and symmetric. `estimate_light_direction` classifies an image back into these five names.

Rendering is orthographic sphere tracing of signed distance functions, vectorised over pixels with numpy
(no per-pixel Python loops), at 2x2 supersampling so that the matte has soft, anti-aliased edges.
Everything is a pure function of (seed, index, resolution): example `i` uses
`numpy.random.default_rng([seed, i])`, so the same arguments give byte-identical files on one machine.

    python -m eddpm.synthetic --output_dir data/synthetic --num_examples 50 --resolution 128 --seed 0
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

# Bumped whenever a change to this file alters the generated pixels or metadata.
GENERATOR_VERSION = 1

SHAPES = ("sphere", "cube", "cylinder", "torus", "cone", "capsule")
DIRECTIONS = ("left", "right", "top", "bottom", "front")

# Albedos in sRGB [0, 1]; names are used verbatim in captions.
COLORS = {
    "red": (0.80, 0.14, 0.12),
    "orange": (0.92, 0.48, 0.10),
    "yellow": (0.90, 0.80, 0.16),
    "green": (0.20, 0.62, 0.24),
    "teal": (0.10, 0.58, 0.58),
    "blue": (0.16, 0.30, 0.82),
    "purple": (0.50, 0.24, 0.70),
    "pink": (0.92, 0.50, 0.66),
    "white": (0.90, 0.90, 0.88),
    "gray": (0.55, 0.55, 0.55),
    "brown": (0.52, 0.32, 0.18),
}

# Light tints in sRGB (a rough blackbody look: about 3000 K, 6500 K and 10000 K).
LIGHT_TINTS = {
    "warm": (1.00, 0.78, 0.55),
    "neutral": (1.00, 1.00, 1.00),
    "cool": (0.62, 0.78, 1.00),
}

# Unit vectors TOWARDS the light in view space: x right, y up, z towards the camera. A small z keeps
# the far side of the object in shadow, so the direction is obvious from the shading.
LIGHT_VECTORS = {
    "left": (-1.0, 0.0, 0.3),
    "right": (1.0, 0.0, 0.3),
    "top": (0.0, 1.0, 0.3),
    "bottom": (0.0, -1.0, 0.3),
    "front": (0.0, 0.0, 1.0),
}

CONDITION_GRAY = 127  # IC-Light's background gray (docs/iclight-facts.md, "Condition encoding")
SUPERSAMPLE = 2  # rays per pixel along each axis
_MARCH_STEPS = 96
_HIT_EPS = 1e-3
_BOUND = 0.8  # every shape (at scale <= 1) fits in a sphere of this radius around its centre


# --- colour -------------------------------------------------------------------------------------------


def srgb_to_linear(c: np.ndarray) -> np.ndarray:
    """sRGB [0, 1] -> linear light (IEC 61966-2-1 transfer function)."""
    c = np.asarray(c, dtype=np.float64)
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(c: np.ndarray) -> np.ndarray:
    """Linear light -> sRGB [0, 1], clipped."""
    c = np.clip(np.asarray(c, dtype=np.float64), 0.0, 1.0)
    return np.where(c <= 0.0031308, c * 12.92, 1.055 * c ** (1 / 2.4) - 0.055)


# --- geometry -----------------------------------------------------------------------------------------


def _length2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sqrt(a * a + b * b)


def _sdf(shape: str, p: np.ndarray, size: dict) -> np.ndarray:
    """Signed distance from object-space points p [N, 3] to a shape centred at the origin (axis = y)."""
    x, y, z = p[:, 0], p[:, 1], p[:, 2]
    if shape == "sphere":
        return np.sqrt(x * x + y * y + z * z) - size["r"]
    if shape == "cube":  # rounded box
        q = np.abs(p) - (size["half"] - size["round"])
        outside = np.linalg.norm(np.maximum(q, 0.0), axis=1)
        inside = np.minimum(q.max(axis=1), 0.0)
        return outside + inside - size["round"]
    if shape == "cylinder":  # capped, radius r, half-height h
        dx = _length2(x, z) - size["r"]
        dy = np.abs(y) - size["h"]
        return np.minimum(np.maximum(dx, dy), 0.0) + _length2(np.maximum(dx, 0.0), np.maximum(dy, 0.0))
    if shape == "torus":  # major radius R in the xz plane, tube radius r
        return _length2(_length2(x, z) - size["R"], y) - size["r"]
    if shape == "capsule":  # segment from -h to h on y, radius r
        return np.sqrt(x * x + (y - np.clip(y, -size["h"], size["h"])) ** 2 + z * z) - size["r"]
    if shape == "cone":  # exact capped cone: base radius r1 at y=-h, tip radius r2 at y=+h
        h, r1, r2 = size["h"], size["r"], size["tip"]
        qx, qy = _length2(x, z), y
        k2x, k2y = r2 - r1, 2.0 * h
        ca_x = qx - np.minimum(qx, np.where(qy < 0.0, r1, r2))
        ca_y = np.abs(qy) - h
        f = np.clip(((r2 - qx) * k2x + (h - qy) * k2y) / (k2x * k2x + k2y * k2y), 0.0, 1.0)
        cb_x = qx - r2 + k2x * f
        cb_y = qy - h + k2y * f
        sign = np.where((cb_x < 0.0) & (ca_y < 0.0), -1.0, 1.0)
        return sign * np.sqrt(np.minimum(ca_x * ca_x + ca_y * ca_y, cb_x * cb_x + cb_y * cb_y))
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _rotation(rx: float, ry: float, rz: float) -> np.ndarray:
    """Object-to-world rotation R = Rz @ Rx @ Ry (angles in radians)."""
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    rot_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rot_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rot_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rot_z @ rot_x @ rot_y


def _trace(shape: str, size: dict, rotation: np.ndarray, u: np.ndarray, v: np.ndarray):
    """Sphere-trace orthographic rays through (u, v) along -z. Returns (hit [N] bool, world normals [N, 3]).

    Every shape fits in a sphere of radius _BOUND, so rays start on it and stop when they leave it.
    """
    hit = np.zeros(u.size, dtype=bool)
    normals = np.zeros((u.size, 3))
    idx = np.nonzero(u * u + v * v < _BOUND**2)[0]  # rays that can meet the object
    p = np.stack([u[idx], v[idx], np.sqrt(_BOUND**2 - u[idx] ** 2 - v[idx] ** 2)], axis=1)  # [M, 3]
    exit_z = -p[:, 2].copy()
    live = np.arange(idx.size)
    for _ in range(_MARCH_STEPS):
        dist = _sdf(shape, p[live] @ rotation, size)  # row vectors: p_obj = R^T p_world
        p[live, 2] -= dist
        now_hit = dist < _HIT_EPS
        hit[idx[live[now_hit]]] = True
        live = live[~now_hit & (p[live, 2] > exit_z[live])]
        if live.size == 0:
            break
    found = hit[idx]
    p, idx = p[found], idx[found]
    grad = np.empty((idx.size, 3))
    for axis in range(3):  # central differences of the SDF: a loop over 3 axes, not pixels
        step = np.zeros(3)
        step[axis] = 1e-4
        grad[:, axis] = _sdf(shape, (p + step) @ rotation, size) - _sdf(shape, (p - step) @ rotation, size)
    normals[idx] = grad / np.maximum(np.linalg.norm(grad, axis=1, keepdims=True), 1e-12)
    return hit, normals


# --- one example --------------------------------------------------------------------------------------


@dataclass
class Example:
    """One rendered pair. Images are uint8; `condition` is RGBA (straight alpha, gray 127 where alpha=0)."""

    target: np.ndarray  # [H, W, 3] uint8
    condition: np.ndarray  # [H, W, 4] uint8
    meta: dict  # shape, color, light_direction, ... (the extra metadata.jsonl fields)
    text: str


def _sample_scene(rng: np.random.Generator, index: int, direction: str | None = None) -> dict:
    # Directions and shapes cycle with the index so that any run of 30 examples holds every
    # (shape, direction) pair (5 and 6 are coprime) and every 5 examples are direction-balanced.
    # A given `direction` replaces only the light: the random draws, hence the scene, stay the same.
    if direction is None:
        direction = DIRECTIONS[index % len(DIRECTIONS)]
    elif direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    shape = SHAPES[index % len(SHAPES)]
    color = list(COLORS)[rng.integers(len(COLORS))]
    temperature = list(LIGHT_TINTS)[rng.integers(len(LIGHT_TINTS))]
    albedo = np.clip(np.array(COLORS[color]) + rng.uniform(-0.05, 0.05, 3), 0.02, 0.98)
    scale = rng.uniform(0.85, 1.0)
    size = {
        "sphere": {"r": 0.62 * scale},
        "cube": {"half": 0.42 * scale, "round": 0.04},
        "cylinder": {"r": 0.40 * scale, "h": 0.45 * scale},
        "torus": {"R": 0.46 * scale, "r": 0.18 * scale},
        "cone": {"r": 0.50 * scale, "h": 0.50 * scale, "tip": 0.02},
        "capsule": {"r": 0.30 * scale, "h": 0.32 * scale},
    }[shape]
    if shape == "cube":  # yaw 45 deg shows two side faces symmetrically, tilt shows the top face
        angles = (rng.uniform(0.25, 0.45), np.pi / 4 + rng.uniform(-0.1, 0.1), rng.uniform(-0.1, 0.1))
    elif shape == "torus":
        angles = (rng.uniform(0.7, 1.1), 0.0, rng.uniform(-0.3, 0.3))
    elif shape == "cone":  # seen almost along its axis, tip towards the camera, so its flanks face every
        # way: an upright cone is lit evenly by a top light, and a half-tilted one is lopsided under a
        # front light
        angles = (rng.uniform(1.4, 1.5), 0.0, rng.uniform(-0.1, 0.1))
    elif shape == "cylinder":  # about 45 deg of tilt: under a front light the cap and the side match
        angles = (rng.uniform(0.65, 0.85), 0.0, rng.uniform(-0.25, 0.25))
    else:  # axis mostly vertical, tilted towards the camera so a cap is visible
        angles = (rng.uniform(0.25, 0.5), rng.uniform(-0.3, 0.3), rng.uniform(-0.25, 0.25))
    # A few degrees of jitter; less for the front light, whose class is "no gradient".
    jitter = 0.03 if direction == "front" else 0.08
    light = np.array(LIGHT_VECTORS[direction]) + rng.uniform(-jitter, jitter, 3)
    return {
        "shape": shape,
        "size": size,
        "rotation": _rotation(*angles),
        "offset": rng.uniform(-0.06, 0.06, 2),
        "color": color,
        "albedo": albedo,
        "direction": direction,
        "temperature": temperature,
        "light": light / np.linalg.norm(light),
        "tint": np.array(LIGHT_TINTS[temperature]),
        "intensity": rng.uniform(1.0, 1.25),
        "ambient": rng.uniform(0.04, 0.08),
        "specular": rng.uniform(0.15, 0.45),
        "shininess": rng.uniform(16.0, 64.0),
        "background": rng.uniform(0.02, 0.06),
    }


def _background(scene: dict, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Linear-light background [N, 3]: brighter towards the light, tinted by its colour."""
    lx, ly = scene["light"][0], scene["light"][1]
    if scene["direction"] == "front":  # a soft spot behind the subject
        ramp = np.clip(1.0 - np.sqrt(u * u + v * v) / np.sqrt(2.0), 0.0, 1.0)
    else:  # 1 on the lit edge, 0 on the opposite one
        ramp = np.clip(0.5 + 0.5 * (u * lx + v * ly) / np.hypot(lx, ly), 0.0, 1.0)
    level = scene["background"] + 0.45 * ramp**1.5
    return level[:, None] * srgb_to_linear(scene["tint"])[None, :]


def render_example(seed: int, index: int, resolution: int = 128, direction: str | None = None) -> Example:
    """Render example `index` of the set generated with `seed` at `resolution` x `resolution`.

    `direction` (one of DIRECTIONS) relights the same scene from another side: object, pose, albedo, light
    colour and the condition image are those of example `index`; only the light and the background move.
    """
    rng = np.random.default_rng([seed, index])
    scene = _sample_scene(rng, index, direction)
    n = resolution * SUPERSAMPLE
    centres = (np.arange(n) + 0.5) / n * 2.0 - 1.0  # [-1, 1] across the image
    u = np.tile(centres, n) - scene["offset"][0]  # x grows to the right
    v = np.repeat(-centres, n) - scene["offset"][1]  # y grows upwards (row 0 is the top)
    hit, normals = _trace(scene["shape"], scene["size"], scene["rotation"], u, v)  # [n*n], [n*n, 3]

    albedo = srgb_to_linear(scene["albedo"])[None, :]  # [1, 3]
    light_rgb = srgb_to_linear(scene["tint"])[None, :] * scene["intensity"]
    n_dot_l = np.clip(normals @ scene["light"], 0.0, None)[:, None]  # [N, 1]
    half = scene["light"] + np.array([0.0, 0.0, 1.0])  # Blinn-Phong half vector, viewer at +z
    half /= np.linalg.norm(half)
    n_dot_h = np.clip(normals @ half, 0.0, None)[:, None]
    lit = albedo * light_rgb * (scene["ambient"] + n_dot_l)
    lit = lit + scene["specular"] * light_rgb * n_dot_h ** scene["shininess"] * (n_dot_l > 0)
    # Flat condition light: uniform plus a little view-facing term to keep the shape readable.
    flat = albedo * (0.8 + 0.2 * np.clip(normals[:, 2:3], 0.0, 1.0))

    target = np.where(hit[:, None], lit, _background(scene, u, v))
    target = linear_to_srgb(target).reshape(resolution, SUPERSAMPLE, resolution, SUPERSAMPLE, 3)
    coverage = hit.reshape(resolution, SUPERSAMPLE, resolution, SUPERSAMPLE, 1).astype(np.float64)
    flat = linear_to_srgb(flat).reshape(resolution, SUPERSAMPLE, resolution, SUPERSAMPLE, 3) * coverage
    alpha = coverage.mean(axis=(1, 3))  # [H, W, 1]
    # Straight (unpremultiplied) colour: the mean over the subpixels that hit the object.
    fg = flat.sum(axis=(1, 3)) / np.maximum(coverage.sum(axis=(1, 3)), 1.0)
    fg = np.where(alpha > 0, fg * 255.0, CONDITION_GRAY)
    condition = np.concatenate([fg, alpha * 255.0], axis=2)

    meta = {
        "shape": scene["shape"],
        "color": scene["color"],
        "light_direction": scene["direction"],
        "light_temperature": scene["temperature"],
        "light_vector": [round(float(c), 4) for c in scene["light"]],
        "albedo": [round(float(c), 4) for c in scene["albedo"]],
        "seed": seed,
        "index": index,
    }
    text = f"{scene['color']} {scene['shape']}, {scene['temperature']} light from the {scene['direction']}"
    return Example(
        target=_to_uint8(target.mean(axis=(1, 3)) * 255.0),
        condition=_to_uint8(condition),
        meta=meta,
        text=text,
    )


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


# --- evaluation helper --------------------------------------------------------------------------------


def light_gradient(rgb: np.ndarray, alpha: np.ndarray) -> tuple[float, float]:
    """Offset of the brightness centroid from the matte centroid, in matte standard deviations.

    rgb [H, W, 3] uint8 or float, alpha [H, W] in [0, 1]. Returns (dx, dy) with x to the right and y
    UPWARDS, so a light from the left gives dx < 0 and one from the top gives dy > 0.
    """
    rgb = np.asarray(rgb, dtype=np.float64)
    w = np.asarray(alpha, dtype=np.float64)
    if w.sum() <= 0:
        raise ValueError("the matte is empty")
    luma = rgb[..., 0] * 0.2126 + rgb[..., 1] * 0.7152 + rgb[..., 2] * 0.0722
    rows, cols = np.mgrid[0 : w.shape[0], 0 : w.shape[1]].astype(np.float64)
    out = []
    for coord in (cols, -rows):
        centre = (w * coord).sum() / w.sum()
        spread = np.sqrt((w * (coord - centre) ** 2).sum() / w.sum()) + 1e-9
        bright_centre = (w * luma * coord).sum() / max((w * luma).sum(), 1e-9)
        out.append(float((bright_centre - centre) / spread))
    return out[0], out[1]


def estimate_light_direction(rgb: np.ndarray, alpha: np.ndarray, front_threshold: float = 0.13) -> str:
    """Classify an image's light as left/right/top/bottom/front from the brightness gradient in the matte.

    "front" when the brightness centroid is within `front_threshold` matte standard deviations of the
    matte centroid; otherwise the side (of the image) the brightness leans towards.
    """
    dx, dy = light_gradient(rgb, alpha)
    if max(abs(dx), abs(dy)) < front_threshold:
        return "front"
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "top" if dy > 0 else "bottom"


# --- writing a set ------------------------------------------------------------------------------------


def generate(output_dir: str, num_examples: int, resolution: int = 128, seed: int = 0,
             all_directions: bool = False) -> list[dict]:
    """Write `num_examples` pairs and `metadata.jsonl` to `output_dir`; return the metadata rows.

    With `all_directions`, each of the `num_examples` scenes is rendered under all five lights (5 rows
    sharing one condition image, as relighting data of one object under several lights is): the text is
    then the only thing that tells the five targets apart.
    Layout: target/NNNNN.png (RGB), condition/NNNNN.png (RGBA) (NNNNN_<direction>.png for the targets with
    all_directions), metadata.jsonl, generation.json (the arguments, so the set can be regenerated and
    checked). Existing files of the same names are replaced.
    """
    if num_examples < 1 or resolution < 16:
        raise ValueError("need num_examples >= 1 and resolution >= 16")
    os.makedirs(os.path.join(output_dir, "target"), exist_ok=True)
    os.makedirs(os.path.join(output_dir, "condition"), exist_ok=True)
    rows = []
    for index in range(num_examples):
        condition_name = f"condition/{index:05d}.png"
        for direction in DIRECTIONS if all_directions else (None,):
            example = render_example(seed, index, resolution, direction)
            target_name = f"target/{index:05d}{'_' + direction if direction else ''}.png"
            # Fixed PNG settings and no text chunks, so the bytes depend on the pixels only.
            Image.fromarray(example.target).save(os.path.join(output_dir, target_name), compress_level=9)
            if direction in (None, DIRECTIONS[0]):  # the condition does not depend on the light
                Image.fromarray(example.condition).save(os.path.join(output_dir, condition_name), compress_level=9)
            rows.append(
                {
                    "file_name": target_name,
                    "conditioning_file_name": condition_name,
                    "text": example.text,
                    **example.meta,
                }
            )
    with open(os.path.join(output_dir, "metadata.jsonl"), "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    arguments = {
        "generator": "eddpm.synthetic",
        "generator_version": GENERATOR_VERSION,
        "num_examples": num_examples,
        "resolution": resolution,
        "seed": seed,
    }
    if all_directions:  # absent otherwise, so data/synthetic/generation.json stays as it is
        arguments["all_directions"] = True
    with open(os.path.join(output_dir, "generation.json"), "w", encoding="utf-8", newline="\n") as f:
        f.write(json.dumps(arguments, indent=2) + "\n")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True, help="folder to write images and metadata.jsonl into")
    parser.add_argument("--num_examples", type=int, default=50, help="number of (target, condition) pairs")
    parser.add_argument("--resolution", type=int, default=128, help="square image side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="example i uses numpy default_rng([seed, i])")
    parser.add_argument("--all_directions", action="store_true",
                        help="render every scene under all five lights (5 rows per scene, one condition)")
    args = parser.parse_args(argv)
    rows = generate(args.output_dir, args.num_examples, args.resolution, args.seed, args.all_directions)
    counts = {d: sum(r["light_direction"] == d for r in rows) for d in DIRECTIONS}
    print(f"wrote {len(rows)} examples to {args.output_dir} (directions: {counts})")


if __name__ == "__main__":
    main()
