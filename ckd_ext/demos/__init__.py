"""Runnable demos of the losses, not part of the library's API: ``classify`` (``ckd-train``: image classifiers on
digits or CIFAR-100) and ``lm`` (``ckd-train-lm``: a small causal language model), with their ``models`` and the
command-line pieces they share (``cli``)."""
