"""Ray orchestration: the only code in moe_lab that imports ray.

- :mod:`.cluster`: start or join a Ray cluster sized for small machines;
- :mod:`.train`: DistributedMoETrainer (Ray Train workers with expert parallelism) and ``moe-lab train``;
- :mod:`.data`: Ray Data streaming of tokenized, packed blocks;
- :mod:`.submit`: Ray Jobs submission (``moe-lab submit``, ``moe-lab jobs``).
"""
