"""gemma-ewc: full-parameter continual pretraining of Gemma2 with Elastic Weight Consolidation."""

__version__ = "0.1.0"
