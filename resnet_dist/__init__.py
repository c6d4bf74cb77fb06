"""resnet_dist: pure-PyTorch core of resnet-dist (models, data, training, checkpoints).

This package never imports ``ray``: it runs on a laptop, under torchrun, or
inside a Ray worker alike.
"""

__version__ = "0.1.0"
