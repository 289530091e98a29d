"""Benchmark: one training step of the embedding layer (forward, backward, row update).

Workloads (each on a batch of --batch instances x --slots slots, one id per slot, dim --dim, run for Zipf(1.1)
ids and for uniform ids over an id space of --rows ids):

  psembed           PSEmbedding(mode=None) over a warm SparseTable (every id of the run pre-pushed, mf
                    admitted) with --rule on lr and mf; forward + backward, whose push applies the update.
                    --rule std_adagrad (the default since session 26) keeps one accumulator per weight, as
                    torch.optim.Adagrad does; adagrad (the table's default, one per row block, what the
                    figures until session 25 used) does less work than the eb_adagrad baseline.
  eb_adagrad        torch.nn.EmbeddingBag(--rows, dim, sparse=True) + torch.optim.Adagrad (one id per bag).
  eb_sparseadam     torch.nn.EmbeddingBag(--rows, dim, sparse=True) + torch.optim.SparseAdam.
  torchrec          TorchRec EmbeddingBagCollection (one --rows table shared by the slots' features) under
                    DistributedModelParallel on CPU (gloo, world size 1) with fused row-wise Adagrad applied
                    in backward; skipped, with a message, when torchrec/fbgemm_gpu are not installed.

With ``--device cuda`` the ids, the gradient and the dense baselines live on the GPU (a model on a GPU): the
PSEmbedding table stays in host memory, so its step includes copying the ids over and the output back (and
its gradient over again); every step ends with a device synchronize. TorchRec is then skipped (its CPU build).

Each reports samples/s (instances per second, from the median wall time of --steps timed steps after --warmup
untimed ones, on pre-built inputs) and its ratio to psembed; psembed also prints the time per phase
(unique, pull, pool, backward, push; medians). The loss is the same for all: sum(out * G) / batch, G fixed.

Usage:
  python scripts/bench_embedding.py                          # full size: 4096 x 26, 10M ids, dim 8
  python scripts/bench_embedding.py --rows 100000 --steps 3 --ids zipf --batch 512   # small, quick
  python scripts/bench_embedding.py --device cuda --skip torchrec                  # ids and baselines on a GPU
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch_psembed as pse  # noqa: E402


def zipf_ranks(rng: np.random.Generator, s: float, n: int, size) -> np.ndarray:
    """Ranks in [0, n) with P(rank k) ~ (k + 1) ** -s (inverse CDF of the continuous truncated power law)."""
    u = rng.random(size)
    a = 1.0 - s
    x = (u * ((n + 1.0) ** a - 1.0) + 1.0) ** (1.0 / a)  # in [1, n + 1)
    return np.minimum(np.floor(x).astype(np.int64) - 1, n - 1)


def make_batches(kind: str, count: int, batch: int, slots: int, rows: int, seed: int = 0):
    """``count`` int64 id matrices ``(batch, slots)`` in [0, rows); Zipf ranks are scattered per slot."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        if kind == "zipf":
            r = zipf_ranks(rng, 1.1, rows, (batch, slots))
            # a different bijection of [0, rows) per slot, so hot ids of different slots differ
            mult = np.array([(2654435761 + 2 * s) % rows or 1 for s in range(slots)], np.int64)
            while True:  # keep each multiplier coprime with rows
                bad = np.gcd(mult, rows) != 1
                if not bad.any():
                    break
                mult[bad] += 1
            ids = (r * mult[None, :] + np.arange(slots)[None, :] * 7919) % rows
        else:
            ids = rng.integers(0, rows, (batch, slots))
        out.append(torch.from_numpy(np.ascontiguousarray(ids, np.int64)))
    return out


def sync() -> None:
    """Wait for the GPU's queued work, so a step's wall time includes it (nothing to wait for on the CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_steps(step, batches, warmup: int):
    """Median wall time of one step over the timed steps (robust to the odd stall of a shared machine)."""
    for b in batches[:warmup]:
        step(b)
    times = []
    for b in batches[warmup:]:
        t0 = time.perf_counter()
        step(b)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


RULES = {"std_adagrad": pse.StdAdaGrad, "adagrad": pse.AdaGrad}


def bench_psembed(args, batches, g):
    cfg = pse.TableConfig(
        dim=args.dim,
        lr_optimizer=RULES[args.rule](initial_range=0.0),
        mf_optimizer=RULES[args.rule](),
        num_threads=args.table_threads,
    )
    table = pse.SparseTable(cfg)
    keys = torch.unique(torch.cat([b.reshape(-1) for b in batches])).cpu()
    # warm: every id of the run has its row and its mf vector (score 100 * nonclk 0.1 >= embedx_threshold)
    for chunk in keys.split(1 << 16):
        n = chunk.numel()
        table.push(chunk, torch.zeros(n, 1 + args.dim), torch.full((n,), 100.0), torch.zeros(n))
    emb = pse.PSEmbedding(table, output="mf")
    warm_rows = len(table)

    def step(ids):
        out = emb(ids)  # (B, slots, dim), on the ids' device
        (out * g).sum().div(ids.shape[0]).backward()
        sync()

    for b in batches[: args.warmup]:
        step(b)
    timings = emb.enable_timing(True)
    times, phases = [], []
    for b in batches[args.warmup :]:
        timings.reset()
        t0 = time.perf_counter()
        step(b)
        times.append(time.perf_counter() - t0)
        phases.append(dict(timings.totals))
    sec = float(np.median(times))
    per_step = {k: float(np.median([p[k] for p in phases])) for k in timings.PHASES}
    assert len(table) == warm_rows, "the warm table should not grow during the timed steps"
    del table, emb
    return sec, per_step, warm_rows


def bench_embedding_bag(args, batches, g, opt_name):
    torch.sparse.check_sparse_tensor_invariants.disable()  # the default, said explicitly (silences a warning)
    eb = torch.nn.EmbeddingBag(args.rows, args.dim, mode="sum", sparse=True, device=args.device)
    with torch.no_grad():
        eb.weight.uniform_(-1e-4, 1e-4)
    if opt_name == "adagrad":
        opt = torch.optim.Adagrad(eb.parameters(), lr=0.05, initial_accumulator_value=3.0)
    else:
        opt = torch.optim.SparseAdam(eb.parameters(), lr=0.001)
    b0 = batches[0]
    offsets = torch.arange(b0.numel(), device=args.device)  # one id per bag

    def step(ids):
        out = eb(ids.reshape(-1), offsets).view(ids.shape[0], ids.shape[1], args.dim)
        opt.zero_grad(set_to_none=True)
        (out * g).sum().div(ids.shape[0]).backward()
        opt.step()
        sync()

    sec = time_steps(step, batches, args.warmup)
    del eb, opt
    return sec


def bench_torchrec(args, batches, g):
    try:
        import torch.distributed as dist
        from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
        from torchrec.distributed.model_parallel import DistributedModelParallel
        from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
        from torchrec.optim.rowwise_adagrad import RowWiseAdagrad
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return None, f"torchrec not available ({type(e).__name__}: {e}); install with `pip install --no-deps " \
                     "fbgemm-gpu-cpu==1.8.0 torchrec==1.8.0 && pip install tensordict torchmetrics==1.0.3 pyre-extensions`"
    import logging
    import warnings

    logging.getLogger("torchrec").setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo", rank=0, world_size=1)
    slots = batches[0].shape[1]
    feats = [f"slot{i}" for i in range(slots)]
    ebc = EmbeddingBagCollection(
        tables=[EmbeddingBagConfig(name="ids", embedding_dim=args.dim, num_embeddings=args.rows, feature_names=feats)],
        device=torch.device("meta"),
    )
    apply_optimizer_in_backward(RowWiseAdagrad, ebc.parameters(), {"lr": 0.05})
    model = DistributedModelParallel(ebc, device=torch.device("cpu"))
    n = batches[0].numel()
    lengths = torch.ones(n, dtype=torch.int64)
    kjts = [KeyedJaggedTensor.from_lengths_sync(keys=feats, values=b.t().reshape(-1), lengths=lengths) for b in batches]
    it = iter(kjts)

    def step(_):
        out = model(next(it)).values().view(-1, slots, args.dim)  # (B, slots * dim), feature-major
        (out * g).sum().div(out.shape[0]).backward()

    sec = time_steps(step, batches, args.warmup)
    del model, ebc, kjts, it, step
    if own_group:  # destroyed and freed now, not at exit (see free_process_groups)
        from torch_psembed.distributed.runtime import free_process_groups

        dist.destroy_process_group()
        free_process_groups()
    return sec, None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--slots", type=int, default=26)
    p.add_argument("--rows", type=int, default=10_000_000, help="id space and rows of the dense baselines")
    p.add_argument("--dim", type=int, default=8)
    p.add_argument("--steps", type=int, default=20, help="timed steps per system")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--ids", choices=["zipf", "uniform", "both"], default="both")
    p.add_argument("--table-threads", type=int, default=0, help="TableConfig.num_threads (0: all cores)")
    p.add_argument("--rule", choices=sorted(RULES), default="std_adagrad",
                   help="the table's rule on lr and mf (std_adagrad: per-weight state, like torch.optim.Adagrad)")
    p.add_argument("--torch-threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--device", default="cpu", help="where the ids, the gradient and the baselines live (cpu, cuda)")
    p.add_argument("--skip", default="", help="comma list of systems to skip: eb_adagrad,eb_sparseadam,torchrec")
    args = p.parse_args(argv)
    skip = {s for s in args.skip.split(",") if s}
    if torch.device(args.device).type != "cpu":
        skip.add("torchrec")  # the fbgemm_gpu-cpu build runs on the CPU only
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    print(f"torch {torch.__version__}, torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, "
          f"torch_psembed {pse.__version__}")
    if args.device != "cpu":
        print(f"device {args.device}: {torch.cuda.get_device_name(args.device)}")
    print(f"batch {args.batch} x {args.slots} slots, dim {args.dim}, id space {args.rows:,}, "
          f"{args.steps} timed steps after {args.warmup} warm-up, psembed rule {args.rule}")
    kinds = ["zipf", "uniform"] if args.ids == "both" else [args.ids]
    data, results = {}, {}
    for kind in kinds:
        batches = make_batches(kind, args.warmup + args.steps, args.batch, args.slots, args.rows)
        g = torch.randn(args.slots, args.dim)
        uniq = np.mean([torch.unique(b).numel() / b.numel() for b in batches])
        batches, g = [b.to(args.device) for b in batches], g.to(args.device)
        data[kind] = (batches, g)
        print(f"\n== {kind} ids: {uniq:.1%} of the ids of a batch are unique ==")
        res = results[kind] = {}
        sec, phases, warm = bench_psembed(args, batches, g)
        res["psembed"] = sec
        print(f"psembed        {args.batch / sec:12,.0f} samples/s  ({sec * 1e3:7.1f} ms/step, warm table "
              f"{warm:,} rows)")
        print("   breakdown    " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in phases.items()))
        gc.collect()
        for name in ("eb_adagrad", "eb_sparseadam"):
            if name in skip:
                print(f"{name:14s} skipped (--skip)")
                continue
            res[name] = bench_embedding_bag(args, batches, g, name[3:])
            _print(name, args.batch, res)
            gc.collect()
    # TorchRec last: importing fbgemm_gpu/torchrec and starting a process group must not disturb the others
    for kind in kinds:
        if "torchrec" in skip:
            print(f"torchrec ({kind}) skipped (--skip)")
            continue
        batches, g = data[kind]
        sec_tr, why = bench_torchrec(args, batches, g)
        if sec_tr is None:
            print(f"torchrec       skipped: {why}")
            break
        results[kind]["torchrec"] = sec_tr
        print(f"\n== {kind} ids ==")
        _print("torchrec", args.batch, results[kind])
        gc.collect()
    return 0


def _print(name, batch, res):
    sec = res[name]
    print(f"{name:14s} {batch / sec:12,.0f} samples/s  ({sec * 1e3:7.1f} ms/step)  "
          f"psembed / {name} = {sec / res['psembed']:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
