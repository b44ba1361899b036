"""The clip's global norm under sharding (issue 13.2), with 2 CPU processes (gloo): each rank
holds a disjoint shard of the gradients, as under FSDP; the all-reduced norm must equal the
unsharded one and the clipped shards must be the shards of the unsharded clip."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vaa.methods.grads import clip_global_, global_norm


def full_grads() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(6, 5, generator=g), torch.randn(7, generator=g)]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        params = []
        for g in full_grads():  # this rank's shard of each flattened tensor
            shard = g.flatten().chunk(world)[rank].clone()
            p = torch.nn.Parameter(torch.zeros_like(shard))
            p.grad = shard
            params.append(p)
        local = float(global_norm([p.grad for p in params]))
        norm = float(clip_global_(params, max_norm=1.0, sharded=True))
        torch.save({"local": local, "norm": norm, "grads": [p.grad for p in params]},
                   f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_clip_norm_is_all_reduced_over_shards(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    ref = [torch.nn.Parameter(torch.zeros_like(g)) for g in full_grads()]
    for p, g in zip(ref, full_grads()):
        p.grad = g.clone()
    expected = float(torch.nn.utils.clip_grad_norm_(ref, 1.0))
    assert ranks[0]["local"] < expected - 1e-3  # a shard's own norm is not the global one
    for r in ranks:
        assert abs(r["norm"] - expected) < 1e-5
    for i, p in enumerate(ref):
        joined = torch.cat([ranks[0]["grads"][i], ranks[1]["grads"][i]])
        torch.testing.assert_close(joined, p.grad.flatten())
