"""Training objectives, registered by name in ``jaxtok.registry.OBJECTIVES``.

Contract: an objective is ``fn(model, batch, rng, args) -> (loss_sum, count, aux)`` registered with its argument
dataclass (``@OBJECTIVES.register("sft", SFTArgs)``); the train loop binds ``args`` and hands the result to
:func:`jaxtok.train.step.make_train_step`. Every module of this package is imported here, so adding a file that
registers an objective is enough to make its name available to configs.
"""

import importlib
import pkgutil

for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")
