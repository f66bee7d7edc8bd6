"""Item encoders: raw content (text, image) -> token states and a pooled vector.

Each encoder splits its backbone into a frozen **bottom** (always ``no_grad`` and eval mode) and a
trainable **top**. The bottom's output depends only on the item and on what ``fingerprint()``
hashes, so it can be computed once per item and cached; training then runs only the top.

- :mod:`mmrec.encoders.text`: Hugging Face transformers (default: packaged all-MiniLM-L6-v2).
- :mod:`mmrec.encoders.image`: timm CNNs (default: packaged EfficientNet-Lite0 ImageNet weights).

This package module stays light: import the submodules for the heavy parts (torch, transformers, timm).
"""
