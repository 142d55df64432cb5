"""BriaRMBG, the background remover IC-Light uses (briaai/RMBG-1.4); the code lives in eddpm/briarmbg.py.

    from briarmbg import BriaRMBG
    net = BriaRMBG.from_pretrained("models/RMBG-1.4")
"""

from eddpm.briarmbg import BriaRMBG

__all__ = ["BriaRMBG"]
