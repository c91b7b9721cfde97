"""Training: pair losses and fine-tuning on feedback, MagLoss and pretraining on identity labels.

Import the sub-modules directly (``magface_al.training.magloss``,
``magface_al.training.pretrain``, ...); this package imports nothing, so
importing one of them does not load the others.
"""
