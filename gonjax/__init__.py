"""gonjax: Gradient Origin Networks (Bond-Taylor & Willcocks, ICLR 2021) in JAX/Flax.

The names a library user needs, from the modules that hold them:

    Config, build_model, Model                       gonjax.config, gonjax.zoo: a run's settings and its model
    origin_step                                      gonjax.origin: the origin gradient every GON variant uses
    TrainState, make_optimizer, create_train_state,  gonjax.steps: the pure steps and their jitted builds
        make_train_step, make_eval_step, build_steps
    load_run, Run                                    gonjax.runs: a trained run, to encode, decode and sample
    train_and_evaluate, train_seeds                  gonjax.train: the trainer (imported on first use: it
                                                     brings the TFDS input pipeline)
"""
from gonjax.config import Config
from gonjax.origin import origin_step
from gonjax.runs import Run, load_run
from gonjax.steps import (TrainState, build_steps, create_train_state, make_eval_step, make_optimizer,
                          make_train_step)
from gonjax.zoo import Model, build_model

__version__ = "0.1.0"
__all__ = ["Config", "Model", "Run", "TrainState", "build_model", "build_steps", "create_train_state", "load_run",
           "make_eval_step", "make_optimizer", "make_train_step", "origin_step", "train_and_evaluate", "train_seeds"]


def __getattr__(name: str):
    if name in ("train_and_evaluate", "train_seeds"):
        from gonjax import train

        return getattr(train, name)
    raise AttributeError(f"module 'gonjax' has no attribute {name!r}")
