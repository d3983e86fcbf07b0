"""Tensor parallelism over torch.distributed (`torchrun --nproc-per-node N -m torchchat ... --tp N`).

group.py: the ranks and rank 0's control channel; sharding.py: which slice of each weight a rank
holds; runtime.py: rank 0's runtime and the other ranks' follower loop; bench.py: `bench --tp`.
"""
