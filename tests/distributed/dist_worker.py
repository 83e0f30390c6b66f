"""One rank of the distributed tests (started by ``test_ddp.py`` as a process per rank, torchrun's way: RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment), or the single-process reference (``reference``).

Every scenario trains the same model from the same initial weights on the same global batches; rank r takes the
samples ``r::world_size`` of each batch. The final parameters are saved to ``<out>/<scenario>.rank<r>.pt``.
"""
from __future__ import annotations

import datetime
import functools
import os
import sys
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import fastdp
from fastdp.methods import SPARTA, AdaDPIGU, BiTFiT, LastLayer, RandomGroups, RandomSparsification

D_IN, CLASSES = 6, 3
# global batch sizes of the steps: the last has one sample, so with 2 or 3 ranks some rank's batch is empty
BATCHES = (12, 9, 1)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(D_IN, 8)
        self.norm = nn.LayerNorm(8)
        self.fc2 = nn.Linear(8, 8)
        self.head = nn.Linear(8, CLASSES)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.tanh(self.norm(self.fc1(x))))))


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(b, D_IN, generator=g), torch.randint(0, CLASSES, (b,), generator=g)) for b in BATCHES]


DP = dict(noise_multiplier=0.0, max_grad_norm=0.5, expected_batch_size=10, sample_size=100)


def build(name, model):
    """The scenario's DP optimizer on ``model`` (a DDP wrapper or the plain reference model)."""
    params = model.parameters()
    sgd = torch.optim.SGD(params, lr=1.0)
    if name == "flat":
        return fastdp.DPOptimizer(model, sgd, **DP)
    if name == "automatic":
        return fastdp.DPOptimizer(model, sgd, clipping="automatic", **DP)
    if name == "per_layer":
        n = sum(1 for p in model.parameters() if p.requires_grad)
        return fastdp.DPOptimizer(model, sgd, clipping="per_layer", **{**DP, "max_grad_norm": [0.3] * n})
    if name == "adam":
        return fastdp.DPOptimizer(model, torch.optim.Adam(model.parameters(), lr=0.1), **DP)
    if name == "sparta":  # step 1 selection (noisy scores are all-reduced), steps 2-3 sparse
        return SPARTA(model, sgd, sparsity=0.5, warmup_epochs=0, steps_per_epoch=1, **DP)
    if name == "sparta_aggregate":
        return SPARTA(model, sgd, sparsity=0.5, warmup_epochs=0, selection="aggregate", steps_per_epoch=1, **DP)
    if name == "rs":
        return RandomSparsification(model, sgd, final_rate=0.5, epochs=3, steps_per_epoch=1, **DP)
    if name == "rs_ranked":
        return RandomSparsification(model, sgd, final_rate=0.5, epochs=3, ranked=True, steps_per_epoch=1, **DP)
    if name == "adadpigu":
        return AdaDPIGU(model, sgd, retention=0.5, pretrain_epochs=1, steps_per_epoch=1, **DP)
    if name == "bitfit":
        return BiTFiT(model, sgd, **DP)
    if name == "last_layer":
        return LastLayer(model, sgd, **DP)
    if name == "random_groups":
        return RandomGroups(model, sgd, sparsity=0.5, **DP)
    if name == "microadam":
        return fastdp.DPMicroAdam(model, lr=0.05, **DP)
    raise KeyError(name)


EXACT = ("flat", "automatic", "per_layer", "adam", "sparta", "sparta_aggregate", "rs", "rs_ranked", "adadpigu",
         "bitfit", "last_layer", "random_groups", "microadam")


def train(name, rank=0, world=1, fsdp=False):
    """Three steps of scenario ``name`` on this rank's samples; returns the final (full) state dict of the model.

    ``world`` > 1: the model is wrapped in DDP, or with ``fsdp`` sharded with FSDP2 (fc1, fc2 and the root)."""
    torch.manual_seed(0)
    net = Net().double()
    model = net
    if fsdp:
        from torch.distributed.fsdp import fully_shard
        for module in (net.fc1, net.fc2, net):
            fully_shard(module)
    elif world > 1:
        model = nn.parallel.DistributedDataParallel(net)
    opt = build(name, model)
    for x, y in batches():
        x, y = x.double()[rank::world], y[rank::world]
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return {k: (v.full_tensor() if fsdp else v).detach().clone() for k, v in net.state_dict().items()}


FSDP_EXACT = EXACT


def fsdp_microadam_resume(rank, world):
    """DP-MicroAdam on FSDP2 stopped after step 1 and resumed into a fresh model and optimizer (the model loaded after
    the optimizer was built, so its replicas are stale and must be gathered again); returns the full parameters."""
    from torch.distributed.fsdp import fully_shard

    def fresh():
        torch.manual_seed(0)
        net = Net().double()
        fully_shard(net.fc1)
        fully_shard(net.fc2)
        fully_shard(net)
        return net, build("microadam", net)

    def steps(net, opt, which):
        for x, y in [batches()[i] for i in which]:
            F.cross_entropy(net(x.double()[rank::world]), y[rank::world]).backward()
            opt.step()
            opt.zero_grad()

    net, opt = fresh()
    steps(net, opt, [0])
    model_state, opt_state = net.state_dict(), opt.state_dict()
    net, opt = fresh()
    opt.load_state_dict(opt_state)
    net.load_state_dict(model_state)
    steps(net, opt, [1, 2])
    return {k: v.full_tensor().detach().clone() for k, v in net.state_dict().items()}


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=40, n_positions=12, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True)
    return GPT2LMHeadModel(cfg).double()


def gpt2_steps(model, opt, ranks, world):
    """Two steps; each runs the samples of ``ranks`` (one rank's, or all of them as micro-batches in rank order)."""
    g = torch.Generator().manual_seed(3)
    for b in (6, 3):
        ids = torch.randint(0, 40, (b, 10), generator=g)
        for r in ranks:
            part = ids[r::world]
            model(input_ids=part, labels=part).loss.backward()
        opt.step()
        opt.zero_grad()


def gpt2_reference(world):
    """One process running each rank's samples as a micro-batch: the same sums as the ranks' (HF GPT-2's forward
    differs from a per-sample loop in the last ~1e-9 at some batch sizes even in float64, so the reference splits the
    batch as the ranks do)."""
    model = tiny_gpt2()
    opt = fastdp.DPOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), **DP)
    gpt2_steps(model, opt, range(world), world)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def fsdp_misc(rank, world):
    """GPT-2 (tied embedding and head) sharded per block; the noise on a sharded Linear; what is refused."""
    from torch.distributed.fsdp import fully_shard
    model = tiny_gpt2()
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    opt = fastdp.DPOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), **DP)
    scatters, reduces = [], []
    real_scatter, real_reduce = dist.reduce_scatter_tensor, dist.all_reduce
    dist.reduce_scatter_tensor = lambda *a, **k: (scatters.append(a[1].numel()), real_scatter(*a, **k))[1]
    dist.all_reduce = lambda *a, **k: (reduces.append(a[0].numel()), real_reduce(*a, **k))[1]
    try:
        gpt2_steps(model, opt, [rank], world)
    finally:
        dist.reduce_scatter_tensor, dist.all_reduce = real_scatter, real_reduce
    gpt2 = {k: v.full_tensor().detach().clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    lin = nn.Linear(200, 100, bias=False)
    fully_shard(lin)
    noisy = fastdp.DPOptimizer(lin, torch.optim.SGD(lin.parameters(), lr=1.0), noise_multiplier=2.0,
                               max_grad_norm=1.5, expected_batch_size=10, sample_size=100,
                               generator=torch.Generator().manual_seed(100 + rank))
    (lin(torch.randn(4, 200)) * 0).sum().backward()
    noisy.step()
    grad = lin.weight.grad.full_tensor().clone()
    refused = {}
    ckpt = tiny_gpt2()
    ckpt.gradient_checkpointing_enable()
    ckpt.train()
    for block in ckpt.transformer.h:
        fully_shard(block)
    fully_shard(ckpt)
    opt = fastdp.DPOptimizer(ckpt, torch.optim.SGD(ckpt.parameters(), lr=0.1), **DP)
    ids = torch.randint(0, 40, (2, 10))
    try:
        ckpt(input_ids=ids, labels=ids).loss.backward()
        refused["checkpointing"] = "accepted"
    except fastdp.UnsupportedLayerError as e:
        refused["checkpointing"] = str(e)
    return {"gpt2": gpt2, "reduce_scatters": scatters, "all_reduces": reduces, "noise_grad": grad, "refused": refused,
            "microadam_resumed": fsdp_microadam_resume(rank, world),
            "numel": sum(p.numel() for p in model.parameters())}


@functools.lru_cache(maxsize=None)
def reference(name):
    return train(name)


def noise_std_run(rank, world):
    """Zero gradients, real noise: the released gradient is the noise / B; returns it (rank's copy)."""
    torch.manual_seed(0)
    net = nn.Linear(200, 100, bias=False)
    model = nn.parallel.DistributedDataParallel(net)
    opt = fastdp.DPOptimizer(model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=2.0,
                             max_grad_norm=1.5, expected_batch_size=10, sample_size=100,
                             generator=torch.Generator().manual_seed(100 + rank))
    calls = []
    model.register_comm_hook(None, _counting_hook(calls))
    x = torch.randn(4, 200)
    (model(x) * 0).sum().backward()
    opt.step()
    grad = net.weight.grad.clone()
    opt.zero_grad()
    sync_off = model.require_backward_grad_sync
    opt.detach()
    return {"grad": grad, "ddp_comm_calls": len(calls), "sync_while_attached": sync_off,
            "sync_after_detach": model.require_backward_grad_sync, "weight": net.weight.detach().clone(),
            "epsilon": opt.epsilon(1e-5), "steps": opt.steps_taken}


def _counting_hook(calls):
    def hook(state, bucket):
        calls.append(1)
        fut = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut
    return hook


def refusals(rank, world):
    out = {}
    net = Net()
    try:  # a plain model in a multi-rank process group
        fastdp.DPOptimizer(net, torch.optim.SGD(net.parameters(), lr=1.0), **DP)
        out["plain"] = "accepted"
    except RuntimeError as e:
        out["plain"] = str(e)
    ddp = nn.parallel.DistributedDataParallel(Net(), static_graph=True)
    try:
        fastdp.DPOptimizer(ddp, torch.optim.SGD(ddp.parameters(), lr=1.0), **DP)
        out["static_graph"] = "accepted"
    except fastdp.UnsupportedLayerError as e:
        out["static_graph"] = str(e)
    ddp = nn.parallel.DistributedDataParallel(Net())
    try:  # the ranks disagree on the expected batch size
        fastdp.DPOptimizer(ddp, torch.optim.SGD(ddp.parameters(), lr=1.0),
                           **{**DP, "expected_batch_size": 10 + rank})
        out["mismatch"] = "accepted"
    except ValueError as e:
        out["mismatch"] = str(e)
    return out


def make_private_run(rank, world):
    """make_private on a DDP model: global sizes, per-rank shards, identical replicas after 3 steps."""
    torch.manual_seed(0)
    net = Net()
    model = nn.parallel.DistributedDataParallel(net)
    data = torch.utils.data.TensorDataset(torch.randn(60, D_IN), torch.randint(0, CLASSES, (60,)))
    loader = torch.utils.data.DataLoader(data, batch_size=12)
    model, opt, dp_loader = fastdp.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
                                                data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0)
    sizes = []
    for x, y in dp_loader:
        sizes.append(len(x))
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return {"expected_batch_size": opt.expected_batch_size, "sample_size": opt.sample_size,
            "sample_rate": opt.sample_rate, "steps": opt.steps_taken, "batches": len(sizes),
            "epsilon": opt.epsilon(1e-5), "state": {k: v.clone() for k, v in net.state_dict().items()},
            "shard_total": dp_loader.batch_sampler.num_samples}


def resume_run(rank, world, out):
    """Noisy SPARTA for 3 steps, uninterrupted vs stopped after step 1 (rank 0 saves, every rank loads the same
    file into a fresh model and optimizer) and resumed: the final parameters and epsilon must be equal."""
    def fresh():
        torch.manual_seed(0)
        net = Net().double()
        model = nn.parallel.DistributedDataParallel(net)
        opt = SPARTA(model, torch.optim.SGD(model.parameters(), lr=0.5), sparsity=0.5, warmup_epochs=0,
                     steps_per_epoch=1, generator=torch.Generator().manual_seed(7),
                     **{**DP, "noise_multiplier": 0.7})
        return net, model, opt

    def steps(model, opt, which):
        for x, y in [batches()[i] for i in which]:
            F.cross_entropy(model(x.double()[rank::world]), y[rank::world]).backward()
            opt.step()
            opt.zero_grad()

    net, model, opt = fresh()
    steps(model, opt, [0, 1, 2])
    whole = {k: v.clone() for k, v in net.state_dict().items()}, opt.epsilon(1e-5)
    net, model, opt = fresh()
    steps(model, opt, [0])
    path = os.path.join(out, "resume.pt")
    if rank == 0:
        torch.save({"model": net.state_dict(), "optimizer": opt.state_dict()}, path)
    dist.barrier()
    ckpt = torch.load(path, weights_only=False)
    net, model, opt = fresh()
    net.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    steps(model, opt, [1, 2])
    return {"whole": whole, "resumed": ({k: v.clone() for k, v in net.state_dict().items()}, opt.epsilon(1e-5))}


def fail_run(rank, world):
    """Rank 1 raises after its first step; the others go on into the second step's collective."""
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(Net())
    opt = fastdp.DPOptimizer(model, torch.optim.SGD(model.parameters(), lr=1.0), **DP)
    for step, (x, y) in enumerate(batches()):
        if step == 1 and rank == 1:
            raise ValueError("rank 1 fails on purpose")
        F.cross_entropy(model(x[rank::world]), y[rank::world]).backward()
        opt.step()
        opt.zero_grad()


def main():
    out, what = sys.argv[1], sys.argv[2]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    fastdp.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=float(os.environ.get(
        "FASTDP_TEST_TIMEOUT", "60"))))
    try:
        parts = what.split("+")  # e.g. "exact+misc+fsdp": several groups in one launch (one start-up)
        if "exact" in parts:
            for name in EXACT:
                torch.save(train(name, rank, world), os.path.join(out, f"{name}.rank{rank}.pt"))
        if "fsdp" in parts:
            for name in FSDP_EXACT:
                torch.save(train(name, rank, world, fsdp=True), os.path.join(out, f"fsdp_{name}.rank{rank}.pt"))
            torch.save(fsdp_misc(rank, world), os.path.join(out, f"fsdp_misc.rank{rank}.pt"))
        if "misc" in parts:
            misc = {"noise": noise_std_run(rank, world), "refusals": refusals(rank, world),
                    "make_private": make_private_run(rank, world), "resume": resume_run(rank, world, out)}
            torch.save(misc, os.path.join(out, f"misc.rank{rank}.pt"))
        if what == "fail":
            fail_run(rank, world)
        elif not set(parts) <= {"exact", "fsdp", "misc"}:
            raise KeyError(what)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
