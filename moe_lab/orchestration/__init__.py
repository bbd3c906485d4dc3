"""Ray orchestration: the only code in moe_lab that imports ray.

- :mod:`.cluster`: start or join a Ray cluster sized for small machines;
- :mod:`.train`: DistributedMoETrainer (Ray Train workers with expert parallelism) and ``moe-lab train``;
- :mod:`.data`: Ray Data streaming of tokenized, packed blocks;
- :mod:`.submit`: Ray Jobs submission (``moe-lab submit``, ``moe-lab jobs``);
- :mod:`.tune`: Ray Tune sweeps (``moe-lab sweep``; the public API is :mod:`moe_lab.tuning`);
- :mod:`.serve`: the Ray Serve deployment (``moe-lab serve``).
"""
