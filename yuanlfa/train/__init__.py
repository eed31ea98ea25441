"""Training: the loop, its schedule, optimizer, metrics and data wiring."""

from yuanlfa.train.schedule import learning_rate
from yuanlfa.train.trainer import TrainResult, train

__all__ = ["TrainResult", "learning_rate", "train"]
