"""What would crash or stall the first multi-GPU run, caught on the CPU: the stats contract, host reads per
iteration, the GPU a rank takes, the collective backend of the training device, per-rank randomness, RNG state
across device types, and R1's precision under bf16."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from ddaebm import distributed
from ddaebm.config import load_config
from ddaebm.training.monitor import Monitor
from ddaebm.training.trainer import RNGWarning, Trainer
from tests.conftest import CONFIGS

TINY_IMAGE = ["data.root=unused", "data.batch=4", "model.nf=8", "model.ch_mult=[1,2]", "model.attn_resolutions=[]",
              "model.image_size=16", "model.encoder_ngf=8", "model.z_emb_dim=16", "model.t_emb_dim=16",
              "model.dropout=0.1"]


class RandomImages:
    """A data stream of uniform images, so the tests need no shards."""

    def __init__(self, shape, batch: int):
        self.shape, self.batch, self.g = tuple(shape), batch, torch.Generator().manual_seed(0)

    def next_batch(self) -> torch.Tensor:
        return torch.rand((self.batch, *self.shape), generator=self.g) * 2 - 1

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def image_trainer(*overrides, rank=0, world=1) -> Trainer:
    cfg = load_config(CONFIGS / "tiny" / "cifar10.yaml", [*TINY_IMAGE, *overrides])
    t = Trainer(cfg, rank, world)
    t._stream = RandomImages(t.model.data_shape, cfg.data.batch // world)
    return t


# ---- 1. the stats contract


def test_every_stat_lives_on_the_training_device_and_the_monitor_stacks_them(tmp_path):
    """The crash of the first multi-GPU log step: CPU scalars beside CUDA loss stats in one torch.stack. Every
    stat of a step is a 0-dim float on the trainer's device, and a Monitor with a reduce (world > 1 emulated)
    logs them."""
    t = image_trainer()
    stats = t.train_step()
    assert {v.device for v in stats.values()} == {t.device} and all(v.dim() == 0 for v in stats.values())
    reduced = []
    monitor = Monitor(tmp_path, 10, 0, 4, 1, reduce=lambda x: reduced.append(x) or x)
    monitor.record(stats)
    row = monitor.step_done(1)
    assert reduced and set(stats) <= set(row)


def test_the_monitor_names_a_stat_off_the_contract(tmp_path):
    monitor = Monitor(tmp_path, 10, 0, 4, 1)
    monitor.record({"a": torch.zeros(())})
    with pytest.raises(TypeError, match="stat 'b'.*meta"):
        monitor.record({"a": torch.zeros(()), "b": torch.zeros((), device="meta")})
    with pytest.raises(TypeError, match="stat 'c'"):
        monitor.record({"c": torch.zeros(3)})


def test_a_resumed_run_drops_the_rows_past_its_step(tmp_path):
    (tmp_path / "stats.jsonl").write_text("".join(f'{{"step": {s}}}\n' for s in (5, 10, 15, 20)))
    Monitor(tmp_path, 40, 10, 4, 5)
    assert (tmp_path / "stats.jsonl").read_text() == '{"step": 5}\n{"step": 10}\n'


# ---- 4. host reads


HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")


def count_host_reads(monkeypatch, fn) -> int:
    """Calls of the Tensor methods that read a value back to the host (a GPU sync) during fn()."""
    count = [0]
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            count[0] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    fn()
    monkeypatch.undo()
    return count[0]


@pytest.mark.parametrize("overrides", [(), ("loss.recon_var_floor_step1=true", "optim.lr_schedule=cosine")])
def test_one_host_read_per_image_iteration(monkeypatch, overrides):
    """At most one read per iteration (the agreed flags, after the last update). FIR resampling is off here:
    on a CPU it reads its four taps as Python numbers (its fastest form there), on a GPU they stay tensors."""
    t = image_trainer("model.fir=false", *overrides)
    t.train_step()  # the first step creates Adam's state
    iters = 3
    reads = count_host_reads(monkeypatch, lambda: [t.train_step() for _ in range(iters)])
    assert reads <= iters, f"{reads} host reads in {iters} iterations"


def test_one_host_read_per_toy_iteration(monkeypatch):
    t = Trainer(load_config(CONFIGS / "toy" / "25gaussians.yaml", ["model.hidden=32", "data.batch=32"]))
    t.train_step()
    reads = count_host_reads(monkeypatch, lambda: [t.train_step() for _ in range(3)])
    assert reads <= 3


# ---- 5. which GPU a rank takes


@pytest.mark.parametrize("local_rank, visible, expected", [(0, 1, 0), (3, 1, 0), (1, 4, 1), (3, 4, 3)])
def test_cuda_index_from_what_the_rank_sees(local_rank, visible, expected):
    assert distributed.cuda_index(local_rank, visible) == expected


def test_more_local_ranks_than_visible_gpus_is_one_clear_line():
    from ddaebm.errors import BadInput

    with pytest.raises(BadInput, match="LOCAL_RANK=2 but this process sees only 2 GPUs"):
        distributed.cuda_index(2, 2)
    with pytest.raises(BadInput, match="sees no GPU"):
        distributed.cuda_index(0, 0)


@pytest.mark.parametrize("env, visible, expected", [
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}, 1, 0),  # srun --gpus-per-task=1
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}, 4, 1),  # srun, every GPU visible
    ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3"}, 4, 3),  # torchrun
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, 1, 0),  # Ray: one GPU per worker
])
def test_resolve_device_maps_launcher_environments(monkeypatch, env, visible, expected):
    # A private environment: discover() writes torchrun's variables for an srun task into it, which must not
    # leak into later tests (a WORLD_SIZE of 8 would make every later CLI call a rank of 8).
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items()
                                        if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")})
    os.environ.update(env)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    assert distributed.resolve_device("auto") == torch.device("cuda", expected)
    assert distributed.resolve_device("cpu") == torch.device("cpu")


# ---- 7. the collective backend follows the training device


def test_cpu_training_on_a_gpu_node_takes_gloo(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **kw: calls.append((backend, kw)))
    monkeypatch.setattr(distributed, "is_initialized", lambda: False)
    monkeypatch.setenv("MASTER_PORT", "29999")
    distributed.init(distributed.DistEnv(0, 2, 0), "torch", 10, device="cpu")
    assert calls[0][0] == "gloo" and calls[0][1]["device_id"] is None
    assert distributed.collective_backend(torch.device("cuda", 1)) == "nccl"


# ---- 6. randomness per rank, and across device types


def test_ranks_share_initial_weights_but_not_dropout_noise():
    """Every rank builds the same weights from train.seed; then rank r > 0 reseeds the global generators, so
    what they draw next (dropout masks) differs between ranks."""
    a = image_trainer("data.batch=8", rank=0, world=2)
    after_0 = torch.rand(8)
    b = image_trainer("data.batch=8", rank=1, world=2)
    after_1 = torch.rand(8)
    for p, q in zip(a.model.energy.parameters(), b.model.energy.parameters()):
        assert torch.equal(p, q)
    assert not torch.equal(after_0, after_1)


def test_rank_zero_keeps_the_single_process_stream():
    torch.manual_seed(123)
    image_trainer()
    one = torch.rand(4)
    image_trainer(rank=0, world=2, *["data.batch=8"])
    assert torch.equal(one, torch.rand(4))


def test_resume_across_device_types_warns_and_continues():
    t = image_trainer()
    t.train_step()
    state = t.state_dict()
    state["rng"] = {**state["rng"], "device": "cuda", "step": torch.zeros(16, dtype=torch.uint8)}
    fresh = image_trainer()
    with pytest.warns(RNGWarning, match="cuda generator"):
        fresh.load_state_dict(state)
    fresh.train_step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image_trainer().load_state_dict(t.state_dict())  # the same device: exact, silent


# ---- 8. R1's precision under bf16


def test_r1_runs_its_pass_in_fp32_under_bf16():
    """loss.r1_precision=fp32: the real pass of a bf16-autocast energy computes in fp32, so R1 equals the fp32
    network's; 'network' leaves it in bf16 (a different, coarser value)."""
    from ddaebm.losses import draw_step_batch, energy_loss
    from ddaebm.networks.precision import autocast_bf16

    t = image_trainer()
    b = draw_step_batch(t.stream.next_batch(), t.schedule, t.gen_enc.generator, t.terms, t.cfg.model.nz,
                        torch.Generator().manual_seed(0))
    energy = t.model.energy.eval()
    with torch.no_grad():  # off its initialisation, where U ≡ 0 makes f = −½‖x‖² exactly, in any precision
        for p in energy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    loss_cfg = type(t.cfg.loss)(**{**t.cfg.loss.__dict__, "r1_target": "energy_only"})  # R1 of ∇f alone
    _, fp32 = energy_loss(energy, t.schedule, b, loss_cfg)
    autocast_bf16(energy)
    _, full = energy_loss(energy, t.schedule, b, loss_cfg)
    _, coarse = energy_loss(energy, t.schedule, b, type(loss_cfg)(**{**loss_cfg.__dict__, "r1_precision": "network"}))
    assert torch.equal(full["r1"], fp32["r1"]) and torch.equal(full["f_real"], fp32["f_real"])
    assert not torch.equal(coarse["r1"], fp32["r1"])
