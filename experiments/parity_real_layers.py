"""Proxy-loss parity: quipjax quantize_linear vs official QuIP# quantize() on real SmolLM2-135M
layers / Hessians.

Stages (paths from the environment: PARITY_OUT (default /tmp/parity), PARITY_HESSIANS (a
Hessian directory written by experiments/quantize.py, e.g. $QUIPJAX_CACHE/hessians/<hash>),
OFFICIAL_HARNESS (a folder with the official quip-sharp `lib/` importable on CPU and a
`run_official.py` providing `make_args` and the CUDA-import stubs)):
  python experiments/parity_real_layers.py prep     # W.npy / H.npy per (layer, group)
  python experiments/parity_real_layers.py quipjax  # quipjax runs -> $PARITY_OUT/quipjax.tsv
  <official venv python> experiments/parity_real_layers.py official  # -> official.tsv
  python experiments/parity_real_layers.py report   # merge -> results.tsv, print tables

Proxy loss (both sides, recomputed here in float64 from the dequantized What):
  tr((What-W) Hreg (What-W)^T) / tr(W Hreg W^T),  Hreg = H / mean(diag H) + 1e-2 I.
"""
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import time
import numpy as np

OUT = os.environ.get("PARITY_OUT", "/tmp/parity")
DATA = f"{OUT}/data"
HESS = os.environ.get("PARITY_HESSIANS", "")
HARNESS = os.environ.get("OFFICIAL_HARNESS", "/work/baseline_official")
LAYERS = [int(x) for x in os.environ.get("PARITY_LAYERS", "0,10,20,29").split(",")]
GROUPS = ["qkv", "o", "up", "down"]
RUN_GROUPS = os.environ.get("PARITY_GROUPS", "qkv,o,up,down").split(",")
TAG = os.environ.get("PARITY_TAG", "")
BITS = {2: ("E8P12", 0.9), 3: ("E8P12RVQ3B", 0.98), 4: ("E8P12RVQ4B", 1.03)}
SEEDS = [int(s) for s in os.environ.get("PARITY_SEEDS", "0,1").split(",")]
SIGMA = 1e-2


def proxy64(W, What, H):
    W = W.astype(np.float64)
    E = What.astype(np.float64) - W
    H = H.astype(np.float64)
    H = H / np.mean(np.diag(H)) + SIGMA * np.eye(H.shape[0])
    return float(np.sum((E @ H) * E) / np.sum((W @ H) * W))


def runs():
    for layer in LAYERS:
        for g in RUN_GROUPS:
            for bits in BITS:
                for seed in SEEDS:
                    yield layer, g, bits, seed


def prep():
    import jax
    from quipjax import LLAMA, fuse, open_checkpoint
    from quipjax.models.adapter import get_path
    from quipjax.models.loaders import load_block
    from quipjax.pipeline.hessians import load_layer_hessians
    if not HESS:
        sys.exit("set PARITY_HESSIANS to a Hessian directory written by experiments/quantize.py")
    os.makedirs(DATA, exist_ok=True)
    src = open_checkpoint(None)
    for layer in LAYERS:
        hs = load_layer_hessians(HESS, layer)
        blk = load_block(src, layer, jax.numpy.float32)
        for g in LLAMA.groups:
            # the pipeline's fused group matrix (quipjax.group.fuse)
            W, _ = fuse([np.asarray(get_path(blk, m).weight[...], np.float32) for m in g.members])
            H = np.asarray(hs[g.name], np.float32)
            np.save(f"{DATA}/W_{layer:03d}_{g.name}.npy", W)
            np.save(f"{DATA}/H_{layer:03d}_{g.name}.npy", H)
            print(layer, g.name, W.shape, H.shape, flush=True)


def run_quipjax():
    import jax
    from quipjax import quantize_linear
    from quipjax.hessian import regularize
    from quipjax.ldlq import proxy_loss
    path = f"{OUT}/quipjax{TAG}.tsv"
    done = _done(path)
    with open(path, "a") as f:
        for layer, g, bits, seed in runs():
            if (layer, g, bits, seed) in done:
                continue
            W = np.load(f"{DATA}/W_{layer:03d}_{g}.npy")
            H = np.load(f"{DATA}/H_{layer:03d}_{g}.npy")
            cb, scale = BITS[bits]
            t0 = time.perf_counter()
            ql = quantize_linear(W, H, codebook=cb, scale=None, sigma_reg=SIGMA, tune_iters=0,
                                 key=jax.random.key(seed))
            What = np.asarray(ql.dequantize())
            sec = time.perf_counter() - t0
            p32 = float(proxy_loss(jax.numpy.asarray(W), jax.numpy.asarray(What),
                                   regularize(H, SIGMA)))
            p64 = proxy64(W, What, H)
            f.write(f"{layer}\t{g}\t{bits}\t{seed}\t{p64:.8g}\t{p32:.8g}\t{sec:.3f}\n")
            f.flush()
            print("quipjax", layer, g, bits, seed, f"{p64:.6g} {p32:.6g} {sec:.2f}s", flush=True)


def run_official():
    """Official quip.quantize via the harness's own module (stubs, make_args), in one process.

    Differences from `run_official.py main()`: runs in a loop in one process; 1 thread; for
    n % 128 != 0 (n = 576 here) LDLQ_buffered is called with buf_cols=64 instead of 128 (the
    harness would refuse such n). buf_cols only changes the blocking of the same recursion.
    """
    import argparse
    sys.path.insert(0, HARNESS)
    import run_official as ro          # installs the stubs, imports the official lib
    import torch
    from lib import codebook as cb_mod
    from lib import utils
    from lib.algo import quip
    torch.set_num_threads(1)

    orig_ldlq = quip.LDLQ_buffered

    def ldlq_buffered(Wr, Hr, L, D, cb, args, buf_cols=128):
        n = Wr.shape[1]
        if n % buf_cols != 0:
            buf_cols = 64
        assert n % buf_cols == 0
        return orig_ldlq(Wr, Hr, L, D, cb, args, buf_cols=buf_cols)

    quip.LDLQ_buffered = ldlq_buffered

    cbs = {}
    path = f"{OUT}/official{TAG}.tsv"
    done = _done(path)
    with open(path, "a") as f:
        for layer, g, bits, seed in runs():
            if (layer, g, bits, seed) in done:
                continue
            W_np = np.load(f"{DATA}/W_{layer:03d}_{g}.npy").astype(np.float32)
            H_np = np.load(f"{DATA}/H_{layer:03d}_{g}.npy").astype(np.float32)
            cbname, scale = BITS[bits]
            if cbname not in cbs:
                cbs[cbname] = cb_mod.get_codebook(cbname)
            n = W_np.shape[1]
            a = argparse.Namespace(seed=seed, sigma_reg=SIGMA, scale=scale, codebook=cbname,
                                   tune_iters=0)
            torch.manual_seed(seed)
            np.random.seed(seed)
            W = torch.from_numpy(W_np)
            H = utils.regularize_H(torch.from_numpy(H_np.copy()), n, SIGMA)
            Hreg = H.clone()
            args = ro.make_args(a)
            torch.manual_seed(seed)
            t0 = time.perf_counter()
            hatW, attr = quip.quantize(H, W, 0, cbs[cbname], args)
            sec = time.perf_counter() - t0
            hatW = hatW.float()
            # harness's own proxy formula (against the official in-place regularized H)
            E = hatW.double() - W.double()
            ph = float(((E @ Hreg.double()) * E).sum() / ((W.double() @ Hreg.double()) * W.double()).sum())
            p64 = proxy64(W_np, hatW.numpy(), H_np)
            f.write(f"{layer}\t{g}\t{bits}\t{seed}\t{p64:.8g}\t{ph:.8g}\t{sec:.3f}\n")
            f.flush()
            print("official", layer, g, bits, seed, f"{p64:.6g} {ph:.6g} {sec:.2f}s", flush=True)


def _done(path):
    s = set()
    if os.path.exists(path):
        for line in open(path):
            p = line.split("\t")
            s.add((int(p[0]), p[1], int(p[2]), int(p[3])))
    return s


def _read(path):
    d = {}
    for line in open(path):
        p = line.rstrip("\n").split("\t")
        d[(int(p[0]), p[1], int(p[2]), int(p[3]))] = (float(p[4]), float(p[5]), float(p[6]))
    return d


def report():
    q = _read(f"{OUT}/quipjax{TAG}.tsv")
    o = _read(f"{OUT}/official{TAG}.tsv")
    keys = sorted(set(q) & set(o), key=lambda k: (k[2], k[0], GROUPS.index(k[1]), k[3]))
    with open(f"{OUT}/results{TAG}.tsv", "w") as f:
        f.write("layer\tgroup\tbits\tseed\tproxy_quipjax\tproxy_official\tratio"
                "\tquipjax_internal_proxy32\tofficial_harness_proxy\tsec_quipjax\tsec_official\n")
        for k in keys:
            f.write(f"{k[0]}\t{k[1]}\t{k[2]}\t{k[3]}\t{q[k][0]:.8g}\t{o[k][0]:.8g}"
                    f"\t{q[k][0] / o[k][0]:.5f}\t{q[k][1]:.8g}\t{o[k][1]:.8g}"
                    f"\t{q[k][2]:.3f}\t{o[k][2]:.3f}\n")
    print(f"{len(keys)} paired runs")
    for bits in BITS:
        ks = [k for k in keys if k[2] == bits]
        if not ks:
            continue
        print(f"\n{bits}-bit ({BITS[bits][0]}, scale {BITS[bits][1]})")
        print("group  quipjax    official   ratio")
        for g in GROUPS:
            kg = [k for k in ks if k[1] == g]
            if not kg:
                continue
            mq = np.mean([q[k][0] for k in kg]); mo = np.mean([o[k][0] for k in kg])
            print(f"{g:5s}  {mq:.5f}   {mo:.5f}   {mq / mo:.4f}")
        mq = np.mean([q[k][0] for k in ks]); mo = np.mean([o[k][0] for k in ks])
        gm = np.exp(np.mean([np.log(q[k][0] / o[k][0]) for k in ks]))
        print(f"all    {mq:.5f}   {mo:.5f}   {mq / mo:.4f}  (geo-mean of per-run ratios {gm:.4f})")
    print("\nruns differing by > 5%:")
    for k in keys:
        r = q[k][0] / o[k][0]
        if abs(r - 1) > 0.05:
            print("  ", k, f"quipjax {q[k][0]:.5f} official {o[k][0]:.5f} ratio {r:.4f}")
    dq = max(abs(q[k][0] / q[k][1] - 1) for k in keys)
    do = max(abs(o[k][0] / o[k][1] - 1) for k in keys)
    print(f"\nmax rel diff: quipjax fp64 proxy vs quipjax.ldlq.proxy_loss {dq:.2e}; "
          f"official fp64 proxy vs harness formula {do:.2e}")


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in ("prep", "quipjax", "official", "report"):
        sys.exit("usage: parity_real_layers.py prep|quipjax|official|report")
    {"prep": prep, "quipjax": run_quipjax, "official": run_official, "report": report}[sys.argv[1]]()
