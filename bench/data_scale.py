"""The latent cache at scale (issue 15): cold build, start-up on a built cache, files, bytes and memory per
row, and one versus two processes building the same cache.

    python bench/data_scale.py                                  # 1k, 10k, 100k rows; about 30 min on 2 cores
    python bench/data_scale.py --sizes 1000 --two_process_size 1000 --output_dir /tmp/ds   # a quick look

Synthetic rows in the real input formats: a metadata.jsonl folder of 64x64 PNGs (an RGB target and an
RGBA condition per row, every image distinct, 1000 distinct prompts), and the same rows as webdataset
tars of 10k samples. The encoders are cheap stand-ins of the real shapes (latents: an 8x8 average pool to
[4, h/8, w/8]; prompts: [77, 768] seeded by the text, CLIP-L's size), so the numbers measure the data
pipeline, not a VAE. Each measurement runs in a fresh process (peak RSS is its own); page caches are warm.
Bytes per row at 512x640 come from the format: two float16 latents of 4 x 64 x 80 plus the index.
Results: <output_dir>/data_scale.json and data_scale.md (the table of README's data section).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing
import os
import platform
import resource
import shlex
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
EMBED_DIM, PROMPTS, TAR_SAMPLES = 768, 1000, 10_000


# --- synthetic rows ---------------------------------------------------------------------------------------


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def row_images(i: int) -> tuple[bytes, bytes]:
    """Row i's target (RGB, a lit disc) and condition (RGBA, the flat disc), both 64x64, unique to i."""
    color = np.array([(i * 97) % 251, (i * 57) % 241, (i // 241) % 239 + 8], dtype=np.float64)
    ys, xs = np.mgrid[0:64, 0:64]
    inside = (ys - 32) ** 2 + (xs - 32) ** 2 < 400
    shade = np.clip(1.2 - xs / 64, 0.2, 1.2)[..., None]  # light from the left
    target = np.where(inside[..., None], color * shade, 40 + (i % 7)).clip(0, 255).astype(np.uint8)
    condition = np.dstack([np.where(inside[..., None], color, 127).astype(np.uint8), inside * np.uint8(255)])
    return _png(target), _png(condition)


def make_folder(folder: Path, rows: int) -> None:
    """metadata.jsonl and images/<i // 1000>/<i>.png, <i>_cond.png (1000 files a folder)."""
    if (folder / "metadata.jsonl").exists():
        return
    lines = []
    for i in range(rows):
        sub = folder / "images" / f"{i // 1000:04d}"
        if i % 1000 == 0:
            sub.mkdir(parents=True, exist_ok=True)
        target, condition = row_images(i)
        (sub / f"{i:07d}.png").write_bytes(target)
        (sub / f"{i:07d}_cond.png").write_bytes(condition)
        lines.append(json.dumps({"file_name": f"images/{i // 1000:04d}/{i:07d}.png",
                                 "conditioning_file_name": f"images/{i // 1000:04d}/{i:07d}_cond.png",
                                 "text": f"object {i % PROMPTS}, light from the left"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def make_tars(folder: Path, out: Path, rows: int) -> None:
    """The folder's rows as webdataset shards of TAR_SAMPLES samples: KEY.png, KEY.cond.png, KEY.txt."""
    if out.exists():
        return
    out.mkdir(parents=True)
    for first in range(0, rows, TAR_SAMPLES):
        with tarfile.open(out / f"shard-{first // TAR_SAMPLES:05d}.tar", "w") as tar:
            for i in range(first, min(first + TAR_SAMPLES, rows)):
                sub = folder / "images" / f"{i // 1000:04d}"
                for name, data in ((f"{i:07d}.png", (sub / f"{i:07d}.png").read_bytes()),
                                   (f"{i:07d}.cond.png", (sub / f"{i:07d}_cond.png").read_bytes()),
                                   (f"{i:07d}.txt", f"object {i % PROMPTS}, light from the left".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


# --- one measured build (in a fresh process) --------------------------------------------------------------


def stand_in_images(vae, pixels):
    import torch
    import torch.nn.functional as F

    x = F.avg_pool2d(pixels / 127.0 - 1.0, 8)  # [B, 3, h, w]
    return torch.cat([x, x.mean(dim=1, keepdim=True)], dim=1)  # [B, 4, h, w]


def stand_in_prompts(tokenizer, text_encoder, texts):
    import torch

    seeds = [int(hashlib.sha256(t.encode()).hexdigest()[:8], 16) for t in texts]
    return torch.stack([torch.randn(77, EMBED_DIM, generator=torch.Generator().manual_seed(s)) for s in seeds])


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rss_bytes() -> int:
    """Resident memory after returning the heap's free pages to the system (glibc's malloc_trim), so that
    memory a build freed is not counted as held."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build(data: str, cache: str, rank: int = 0, world: int = 1, barrier=None):
    from eddpm.cache import build_latent_cache

    return build_latent_cache(data, cache, vae=None, text_encoder=None, tokenizer=None, resolution=64,
                              model_id="stand-in", encode_images=stand_in_images, encode_prompts=stand_in_prompts,
                              batch_size=32, progress=False, rank=rank, world_size=world, barrier=barrier)


def child_build(data: str, cache: str) -> dict:
    """One build in this process: its time, the memory it holds after (dataset + bucket sampler), its peak."""
    start = time.perf_counter()
    import torch

    import eddpm.cache  # noqa: F401  (imported before the clock and the memory baseline)
    import eddpm.tables  # noqa: F401
    from eddpm.buckets import BucketBatchSampler

    imports = time.perf_counter() - start
    torch.set_num_threads(1)
    before = rss_bytes()
    start, cpu = time.perf_counter(), cpu_seconds()
    dataset = build(data, cache)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    sampler = BucketBatchSampler(dataset, 8)
    held = rss_bytes() - before
    arrays = sum(v.nbytes for v in vars(dataset).values() if isinstance(v, np.ndarray))
    item = dataset[len(dataset) - 1]  # a read works
    assert item["latents"].shape == (4, 8, 8) and item["prompt_embeds"].shape == (77, EMBED_DIM)
    del sampler
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": seconds, "cpu_seconds": cpu, "import_seconds": imports, "rows": len(dataset), "reused": dataset.stats.reused_rows,
            "opened": dataset.stats.opened_rows, "held_bytes": held, "array_bytes": arrays,
            "rss_before": before, "peak_rss": peak}


def _pair_worker(rank: int, data: str, cache: str, barrier, queue) -> None:
    import torch

    torch.set_num_threads(1)
    barrier.wait()  # both imported: start together
    start, cpu = time.perf_counter(), cpu_seconds()
    dataset = build(data, cache, rank=rank, world=2, barrier=barrier.wait)
    queue.put((rank, start, time.perf_counter(), dataset.stats.opened_rows,
               resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, cpu_seconds() - cpu))


def child_pair(data: str, cache: str) -> dict:
    """Two processes (rank 0 and 1) building one cache; wall time from the common start to the last end."""
    context = multiprocessing.get_context("spawn")
    barrier, queue = context.Barrier(2), context.Queue()
    workers = [context.Process(target=_pair_worker, args=(r, data, cache, barrier, queue)) for r in (0, 1)]
    for w in workers:
        w.start()
    results = sorted(queue.get(timeout=3600) for _ in workers)
    for w in workers:
        w.join()
    return {"seconds": max(r[2] for r in results) - min(r[1] for r in results),
            "opened": [r[3] for r in results], "peak_rss": [r[4] for r in results],
            "cpu_seconds": [r[5] for r in results], "busy_seconds": [r[2] - r[1] for r in results]}


def run_child(kind: str, data: Path, cache: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, __file__, "--_child", kind, str(data), str(cache)], env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-4000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def load() -> float:
    return os.getloadavg()[0]


# --- the series -------------------------------------------------------------------------------------------


def disk(cache: Path) -> dict:
    files = [p for p in cache.rglob("*") if p.is_file()]
    by_kind = {"latents": 0, "prompts": 0, "manifest": 0}
    for p in files:
        kind = "manifest" if p.parent.name == "manifests" else p.name.split("-")[0]
        by_kind[kind] = by_kind.get(kind, 0) + p.stat().st_size
    return {"files": len(files), "bytes": by_kind}


def measure_size(rows: int, root: Path, tars: bool) -> dict:
    import shutil

    folder = root / f"rows-{rows}"
    start = time.perf_counter()
    make_folder(folder, rows)
    result = {"rows": rows, "make_seconds": time.perf_counter() - start}
    for fmt in ("metadata.jsonl", "webdataset") if tars else ("metadata.jsonl",):
        data = folder
        if fmt == "webdataset":
            data = root / f"tars-{rows}"
            make_tars(folder, data, rows)
        cache = root / f"cache-{fmt}-{rows}"
        shutil.rmtree(cache, ignore_errors=True)
        cold = {**run_child("build", data, cache), "load": load()}
        warm = {**run_child("build", data, cache), "load": load()}
        assert warm["opened"] == 0, warm
        result[fmt] = {"cold": cold, "warm": warm, "disk": disk(cache)}
        print(f"{rows} rows, {fmt}: cold {cold['seconds']:.1f} s, start-up {warm['seconds']:.2f} s, "
              f"held {warm['held_bytes'] / rows:.0f} B/row, load {warm['load']:.1f}", flush=True)
    return result


def measure_pair(rows: int, root: Path, repeats: int) -> dict:
    import shutil

    folder = root / f"rows-{rows}"
    make_folder(folder, rows)
    runs = []
    for repeat in range(repeats):
        one_cache, two_cache = root / f"pair-one-{rows}", root / f"pair-two-{rows}"
        shutil.rmtree(one_cache, ignore_errors=True), shutil.rmtree(two_cache, ignore_errors=True)
        before = load()
        one = run_child("build", folder, one_cache)
        two = run_child("pair", folder, two_cache)
        runs.append({"one_seconds": one["seconds"], "two_seconds": two["seconds"], "two_opened": two["opened"],
                     "one_cpu_seconds": one["cpu_seconds"], "two_cpu_seconds": two["cpu_seconds"],
                     "speedup": one["seconds"] / two["seconds"], "load_before": before, "load_after": load()})
        print(f"{rows} rows, 1 vs 2 processes (run {repeat + 1}): {one['seconds']:.1f} s vs {two['seconds']:.1f} s "
              f"= {runs[-1]['speedup']:.2f}x (CPU s: {one['cpu_seconds']:.1f} vs "
              f"{' + '.join(f'{c:.1f}' for c in two['cpu_seconds'])}), load {before:.1f} -> "
              f"{runs[-1]['load_after']:.1f}", flush=True)
    return {"rows": rows, "runs": runs}


def per_row_512x640(index_bytes_per_row: float) -> dict:
    latent = 4 * (640 // 8) * (512 // 8) * 2  # float16 [4, 80, 64]
    header = 1024 / 4096 * 2  # the shard header, shared by SHARD_ROWS entries
    return {"latents": 2 * latent, "shard_headers": header, "index": index_bytes_per_row,
            "total": 2 * latent + header + index_bytes_per_row, "per_distinct_prompt": 77 * 768 * 2}


def markdown(results: dict) -> str:
    lines = [f"`{results['command']}` on {results['cpu']} ({results['cores']} cores; the 1-minute load "
             "average is in each row: near or above the core count, other jobs shared the machine).", "",
             "Wall time, with the CPU time of the process in brackets (under load a process gets part of a core).",
             "", "| rows | input | cold build | start-up, built cache | cache files / row | index bytes / row | "
             "memory held / row | peak RSS | load |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results["sizes"]:
        for fmt in ("metadata.jsonl", "webdataset"):
            if fmt not in r:
                continue
            m = r[fmt]
            rows = r["rows"]
            lines.append(
                f"| {rows:,} | {fmt} | {1000 * m['cold']['seconds'] / rows:.2f} ms/row "
                f"({1000 * m['cold']['cpu_seconds'] / rows:.2f}) | {m['warm']['seconds']:.2f} s "
                f"({m['warm']['cpu_seconds']:.2f} s), {1e6 * m['warm']['seconds'] / rows:.0f} us/row | "
                f"{m['disk']['files'] / rows:.5f} | "
                f"{m['disk']['bytes']['manifest'] / rows:.0f} | {m['warm']['held_bytes'] / rows:.0f} B | "
                f"{m['warm']['peak_rss'] / 2**20:.0f} MiB (cold {m['cold']['peak_rss'] / 2**20:.0f}) | "
                f"{m['warm']['load']:.1f} |")
    for p in results.get("pairs", []):
        lines += ["", f"One vs two processes building the same {p['rows']:,}-row cache (cold):", "",
                  "| run | 1 process: wall (CPU) | 2 processes: wall (CPU of each) | speed-up | load before -> after |",
                  "|---|---|---|---|---|"]
        for i, run in enumerate(p["runs"], 1):
            cpus = " + ".join(f"{c:.1f}" for c in run["two_cpu_seconds"])
            lines.append(f"| {i} | {run['one_seconds']:.1f} s ({run['one_cpu_seconds']:.1f} s) | {run['two_seconds']:.1f} s "
                         f"({cpus} s) | {run['speedup']:.2f}x | {run['load_before']:.1f} -> {run['load_after']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000,10000,100000", help="comma list of row counts")
    parser.add_argument("--tars", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure the rows as webdataset tars")
    parser.add_argument("--two_process_size", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=2, help="1-vs-2-process runs")
    parser.add_argument("--data_root", default="/tmp/data_scale", help="where the synthetic rows and caches go")
    parser.add_argument("--output_dir", default=str(REPO / "bench" / "results" / "data_scale"))
    parser.add_argument("--_child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child:
        kind, data, cache = args._child
        print(json.dumps(child_build(data, cache) if kind == "build" else child_pair(data, cache)))
        return {}
    root = Path(args.data_root)
    root.mkdir(parents=True, exist_ok=True)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    results = {"command": "python bench/data_scale.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
               "cpu": cpu, "cores": os.cpu_count(), "sizes": [], "pairs": []}
    for rows in (int(s) for s in args.sizes.split(",")):
        results["sizes"].append(measure_size(rows, root, args.tars))
    if args.two_process_size:
        results["pairs"].append(measure_pair(args.two_process_size, root, args.repeats))
    largest = results["sizes"][-1]
    index = largest["metadata.jsonl"]["disk"]["bytes"]["manifest"] / largest["rows"]
    results["bytes_per_row_512x640"] = per_row_512x640(index)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "data_scale.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "data_scale.md").write_text(markdown(results))
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
