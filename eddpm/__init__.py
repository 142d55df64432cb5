"""EDDPM for IC-Light: the logic shared by train.py, gradio_demo.py and relight.py.

One module per concern: `masks` (the math of Algorithm 1), `iclight` (model plumbing shared by
training and the demo), `images`, `metadata`, `examples`, `buckets`, `cache` (the data path: decoding,
rows, examples, buckets, latent cache), `synthetic` (the bundled dataset generator). Nothing heavy is
imported here, so `python train.py --help` stays fast.
"""

from eddpm import quiet

quiet.install()  # drops a few known-harmless library log messages, by exact text (eddpm/quiet.py)
