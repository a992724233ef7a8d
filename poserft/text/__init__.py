"""Text side of poserft: the project tokenizer (``tokenizer``) and sentence embedders
(``embedder``) used for semantic rewards and answer similarity.

Kept import-free on purpose: the Snakefile imports ``poserft.text.config`` at parse time,
which must not pull in torch, tokenizers or transformers.
"""
