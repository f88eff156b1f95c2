"""The training side of mta-jax: `python -m train --config configs/X.yaml key.sub=value ...`.

config.py (YAML -> validated dataclasses), mesh.py (device mesh and sharding rules), data.py and toy.py
(Grain pipelines), optim.py (Optax), step.py (jitted train/eval steps), checkpoint.py (Orbax),
metrics.py and flops.py (logs, TensorBoard, MFU), loop.py (the run), __main__.py (the CLI).
"""
