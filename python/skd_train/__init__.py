"""skd_train: the reference trainer of skd-kernels (Structured Knowledge Distillation).

    from skd_train import build_config
    from skd_train.train import train
    result = train(build_config(dataset="brain", steps=200, teacher_weights="teacher.pt"))

Importing is cheap: the loop, the models and the data load on use. The command: `skd-train`.
"""
from .config import TrainConfig, build_config, load_file

__all__ = ["TrainConfig", "build_config", "load_file"]
