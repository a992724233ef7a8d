"""Text-pose retrieval (PoseScript-style): a text encoder and a pose encoder mapping into a
shared L2-normalised space, trained with a symmetric InfoNCE loss.

Modules: ``features`` (yaw-normalised pose features), ``losses`` (pure contrastive loss),
``model`` (encoders), ``checkpoint`` (save/load a model directory), ``train`` (the
``train_retrieval`` stage), ``reward`` (``SemanticReward`` for RFT), ``metrics``
(text<->pose Recall@K, also the text->pose benchmark's).

Kept import-free on purpose: the Snakefile imports ``poserft.retrieval.config`` at parse
time, which must not pull in torch.
"""
