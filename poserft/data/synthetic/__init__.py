"""Synthetic embedded world: pose sampler, posecodes, captioner, renderer, VQA, and the
``synthesize`` stage entry point (see ``world.py``)."""

from poserft.data.synthetic.world import synthesize

__all__ = ["synthesize"]
