"""CXR-ML-GZSL (Hayat, Lashen, Shamout 2021): multi-label generalised zero-shot findings.

A DenseNet-121 image encoder and a frozen sentence encoder for label names, each followed by a
projection MLP into one 128-d latent space; a finding's score is the cosine similarity of the
image's latent and the finding's. Findings never seen in training images are scored from their
names alone. Modules: :mod:`.text` (frozen text encoder), :mod:`.model`, :mod:`.losses` (the
paper's objective, implemented as the paper states it), :mod:`.split` (seen / unseen),
:mod:`.metrics` (the paper's table), :mod:`.synthetic` (compositional phantoms),
:mod:`.trainer`, :mod:`.export` (ONNX version folder) and :mod:`.cli`.
"""
