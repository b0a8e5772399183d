"""DistributedDataParallel on CPU: two processes with gloo train the tiny configuration with every loss
on; the student's and the discriminator's replicas must stay identical."""
from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp

from train_helpers import state_dicts_equal, tiny_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, tmp_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from skd_train import distributed
    from skd_train.train import Trainer
    cfg = tiny_config(tmp_path, "ddp", steps=3, batch_size=2, ckpt_every=2)
    trainer = Trainer(cfg)
    result = trainer.run()
    torch.save({"model": {k: v for k, v in trainer.student.named_parameters()},
                "D": trainer.distill.D.state_dict(), "miou": result["miou"],
                "rank_batches": trainer.batches_per_epoch}, tmp_path / f"rank{rank}.pt")
    distributed.cleanup(trainer.env)


def test_two_cpu_processes_keep_identical_replicas(tmp_path):
    tiny_config(tmp_path, "prepare")  # writes the teacher once, before the workers start
    mp.spawn(_worker, args=(2, _free_port(), tmp_path), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert state_dicts_equal(r0["model"], r1["model"]) == []
    assert state_dicts_equal(r0["D"], r1["D"]) == []
    assert r0["miou"] == r1["miou"]  # confusion matrices summed over the ranks
    assert r0["rank_batches"] == 12 // 2 // 2  # each rank reads its half of the samples
    from skd_train.checkpoint import load_checkpoint
    assert load_checkpoint(tmp_path / "ddp" / "last.pt")["step"] == 3
    assert (tmp_path / "ddp" / "log.csv").exists()
