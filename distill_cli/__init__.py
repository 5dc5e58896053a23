"""distill-cli: pretrain, finetune, distill and evaluate models through one run directory."""

__version__ = "0.1.0"
