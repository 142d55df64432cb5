"""Run by tests/test_cache.py under torchrun: build a latent cache on every process (gloo, fake encoders),
twice (cold, then on the built cache), and write what this process did to OUT/rank-<r>.json.

    torchrun --standalone --nproc_per_node 2 tests/cache_worker.py DATA_DIR CACHE_DIR OUT
"""

import json
import sys

import torch.distributed as dist
from test_cache import FakeEncoders, build  # tests/ is on sys.path: this script lives there


def main(data_dir: str, cache_dir: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for launch in ("cold", "warm"):
        encoders = FakeEncoders()
        dataset = build(data_dir, cache_dir, encoders, rank=rank, world_size=world, barrier=dist.barrier)
        results[launch] = {
            "images": encoders.counts["images"], "prompts": encoders.counts["prompts"],
            "opened": dataset.stats.opened_rows, "reused": dataset.stats.reused_rows,
            "lines": [row.line for row in dataset.rows],
            "skips": sorted((s.line, s.kind) for s in dataset.stats.skipped),
            "sums": [[float(dataset[i][k].double().sum()) for k in ("latents", "cond_latents", "prompt_embeds")]
                     for i in range(len(dataset))],
        }
    with open(f"{out}/rank-{rank}.json", "w") as f:
        json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
