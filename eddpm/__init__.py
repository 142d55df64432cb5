"""EDDPM for IC-Light: the logic shared by train.py, gradio_demo.py, relight.py and the benches.

One module per concern (README, "Development", has the table): the EDDPM math and training step (`masks`,
`rewards`, `losses`, `policy`, `training`, `ema`, `scheduler`), IC-Light (`iclight` constants, `weights`,
`ldm`, `lora`, `conditioning`, `prompts`, `conditioned_unet`, `briarmbg`, `models`, `tiny`, `sd15`), data
(`images`, `metadata`, `examples`, `buckets`, `sources`, `tables`, `shards`, `manifest`, `cache_build`,
`cache`, `synthetic`), relighting (`settings`, `relighting`, `samplers`, `schedule_search`, `cli`) and runs
(`config`, `checkpoint`, `export`, `plots`, `quiet`). Modules import only each other, never an entry point.
Nothing heavy is imported here, so `python train.py --help` stays fast.
"""

from eddpm import quiet

quiet.install()  # drops a few known-harmless library log messages, by exact text (eddpm/quiet.py)
