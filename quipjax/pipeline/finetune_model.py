"""Quantization with fine-tuning, model-level: in-block (layer by layer) and end to end.

In-block (QuIP# section 3): for each block, its linear groups are quantized in the adapter's
order (qkv -> o -> gate/up -> down); after each but the last, the block is tuned to reproduce
the FP block's outputs on the FP inputs (MSE): the su/sv of the quantized groups, the weights of
the not-yet-quantized ones and the norms train. A later group is quantized from its tuned
weights with the FP Hessian, as the official code does. The FP inputs of each block stream
through disk files (`ft_acts/` in the output directory), like Hessian collection, and each
finished block is saved, so a killed run resumes at its first unfinished block.

End to end: every su/sv, the norms (and optionally the output head) train to match the FP
model's next-token distribution (KL), with validation and early stopping; the result is saved
as an override of the layers' values (`checkpoint.save_e2e`).
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from quipjax import finetune as ft
from quipjax import hessian as _hessian
from quipjax import ldlq as _ldlq
from quipjax.models.adapter import LLAMA, ModelAdapter, get_path
from quipjax.models.llama import Block, Linear, Llama, LlamaSpec
from quipjax.models.loaders import CheckpointSource, load_block, load_model
from quipjax.pipeline import checkpoint as ckpt
from quipjax.pipeline import evaluate, hessians
from quipjax.pipeline.quantize_model import (QuantSettings, block_fp_params, group_key,
                                             quantize_group, set_param)

__all__ = ["FTSettings", "quantize_layer", "quantize_layers", "finetune_e2e", "tunable_model"]


@dataclasses.dataclass(frozen=True)
class FTSettings:
    """Fine-tuning settings; epochs = 0 / e2e_epochs = 0 switch a stage off.

    Defaults: the paper's (in-block: Adam, lr 5e-5, su/sv lr 5e-4, batch 4 x 2 accumulation,
    5 epochs, 256 train + 128 validation windows, early stop after 3 worse epochs; end to end:
    lr 1e-5, su/sv lr 1e-4, batch 8).
    """

    epochs: int = 0
    lr: float = 5e-5
    susv_lr: float = 5e-4
    bs: int = 4
    update_freq: int = 2
    train_size: int = 256
    valid_size: int = 128
    ctx_size: int = 2048
    early_stop: int = 3
    e2e_epochs: int = 0
    e2e_lr: float = 1e-5
    e2e_susv_lr: float = 1e-4
    e2e_bs: int = 8
    e2e_update_freq: int = 1
    e2e_train_size: int = 256
    e2e_valid_size: int = 128
    e2e_ctx_size: int = 2048
    e2e_early_stop: int = 3
    e2e_train_head: bool = False
    compute_dtype: str = "bfloat16"

    def check(self):
        for name in ("bs", "update_freq", "ctx_size", "e2e_bs", "e2e_update_freq", "e2e_ctx_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"ft {name} must be >= 1, got {getattr(self, name)}")
        if self.epochs and (self.train_size < self.bs or self.valid_size < 1):
            raise ValueError(f"in-block fine-tuning needs ft_train_size >= ft_bs ({self.bs}) and "
                             f"ft_valid_size >= 1, got {self.train_size} / {self.valid_size}")
        if self.e2e_epochs and (self.e2e_train_size < self.e2e_bs or self.e2e_valid_size < 1):
            raise ValueError(f"end-to-end fine-tuning needs e2e_train_size >= e2e_bs "
                             f"({self.e2e_bs}) and e2e_valid_size >= 1")


def _cdt(name):
    return {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[name]


def _set_compute_dtype(module, cdt) -> None:
    for _, node in nnx.iter_graph(module):
        if isinstance(node, Linear):
            node.compute_dtype = cdt


def _proxy(W_members, scales, group, H, sigma_reg) -> float:
    W = jnp.asarray(np.concatenate([np.asarray(w, np.float32) / float(s)
                                    for w, s in zip(W_members, np.asarray(scales))], 0))
    return float(_ldlq.proxy_loss(W, group.ql.dequantize(), _hessian.regularize(H, sigma_reg)))


def quantize_layer(block, hess: dict, settings: QuantSettings, layer: int,
                   ft_cfg: Optional[FTSettings] = None, data=None, adapter: ModelAdapter = LLAMA,
                   log: Optional[Callable] = None, mesh=None):
    """Quantize one block group by group, tuning in between when `ft_cfg.epochs` > 0.

    Args:
      block: the block (float32 weights); modified in place (tuned weights and norms, and the
        quantized members replaced by `TunableQuantLinear`s when tuning).
      hess: {group name: H (n, n)} FP Hessians of the block.
      data: (train_batches(epoch, stage), valid_batches()) for `finetune.block_mse`; needed
        when tuning.
      mesh: a `jax.sharding.Mesh`: the block's variables are placed by
        `quipjax.sharding.RULES` for tuning (pass batches placed with `sharding.put_batch`).
    Returns:
      (groups {name: QuantizedGroup}, info {"proxy": {name: loss}, "curves": {name: [...]}}).
    """
    tuning = ft_cfg is not None and ft_cfg.epochs > 0
    cdt = _cdt(ft_cfg.compute_dtype) if ft_cfg is not None else jnp.bfloat16
    groups, info = {}, {"proxy": {}, "curves": {}}
    for gi, g in enumerate(adapter.groups):
        ws = [np.asarray(get_path(block, m).weight[...], np.float32) for m in g.members]
        qg = quantize_group(ws, hess[g.name], settings, group_key(settings.seed, layer, gi))
        qg = dataclasses.replace(qg, members=g.members)
        info["proxy"][g.name] = _proxy(ws, qg.scales, qg, hess[g.name], settings.sigma_reg)
        groups[g.name] = qg
        if tuning:
            ft.attach_tunable(block, qg, cdt)
            if mesh is not None:
                from quipjax import sharding
                sharding.shard_module(block, mesh)
            if gi < len(adapter.groups) - 1:
                train_b, valid_b = data
                tc = ft.TuneConfig(epochs=ft_cfg.epochs, lr=ft_cfg.lr, susv_lr=ft_cfg.susv_lr,
                                   batch_size=ft_cfg.bs, update_freq=ft_cfg.update_freq,
                                   early_stop=ft_cfg.early_stop, seed=settings.seed)
                curve = ft.tune(block, ft.block_mse, lambda e, gi=gi: train_b(e, gi), valid_b, tc)
                info["curves"][g.name] = curve
                if log:
                    c0, cb = curve[0]["valid"], min(c["valid"] for c in curve)
                    log(f"layer {layer} after {g.name}: block MSE {c0:.4g} -> {cb:.4g} "
                        f"({len(curve) - 1} epochs)")
    if tuning:
        groups = {k: ft.detach_tunable(block, g) for k, g in groups.items()}
    return groups, info


class _Windows:
    """Batches of (FP inputs, FP outputs) of one block from two activation files."""

    def __init__(self, x_file, y_file, n_train, bs, seed, layer, mesh=None):
        self.x, self.y = x_file, y_file
        self.n_train, self.bs, self.seed, self.layer = n_train, bs, seed, layer
        self.n = x_file.shape[0]
        self.mesh = mesh

    def _batch(self, idx):
        x = np.stack([self.x.read(i, i + 1)[0] for i in idx])
        y = np.stack([self.y.read(i, i + 1)[0] for i in idx])
        if self.mesh is not None:                 # the windows split over the devices
            from quipjax import sharding
            return sharding.put_batch((x, y), self.mesh)
        return jnp.asarray(x), jnp.asarray(y)

    def train(self, epoch, stage):
        rng = np.random.default_rng([self.seed, self.layer, stage, epoch])
        perm = rng.permutation(self.n_train)
        for b in range(0, self.n_train - self.bs + 1, self.bs):     # drop the ragged tail
            yield self._batch(perm[b:b + self.bs])

    def valid(self):
        for b in range(self.n_train, self.n, self.bs):
            yield self._batch(range(b, min(b + self.bs, self.n)))


def _acts(work, i):
    return os.path.join(work, f"acts_{i:03d}.npy")


def quantize_layers(src: CheckpointSource, out: str, hdir: str, settings: QuantSettings,
                    ft_cfg: FTSettings, windows: np.ndarray, *, adapter: ModelAdapter = LLAMA,
                    progress: Optional[Callable] = None, log: Optional[Callable] = None,
                    mesh=None) -> None:
    """Quantize (and in-block tune) every unfinished layer of the checkpoint in `out`.

    windows: (train + valid, ctx) int32 fine-tuning windows (unused without tuning).
    progress(layer, info) after each saved layer. mesh: a `jax.sharding.Mesh`; without
    tuning, the groups of several layers are quantized in parallel, one matrix per device
    (`sharding.quantize_layers_distributed`, same codes); with tuning, the layers stay
    sequential and the tuning batches are split over the devices.
    """
    spec = src.spec
    L = spec.num_layers
    todo = [i for i in range(L) if not ckpt.layer_done(out, i)]
    if not todo:
        return
    tuning = ft_cfg.epochs > 0
    if mesh is not None and not tuning:
        from quipjax import sharding
        sharding.quantize_layers_distributed(src, out, hdir, settings, mesh, adapter=adapter,
                                             progress=progress, log=log)
        return
    cdt = _cdt(ft_cfg.compute_dtype)
    work = os.path.join(out, "ft_acts")
    if tuning:
        os.makedirs(work, exist_ok=True)
        first = todo[0]
        if not os.path.exists(_acts(work, first)):
            # inputs of `first` are gone (or this is the start): rebuild them with the FP model
            hessians._embed_all(src, windows, _acts(work, 0), 1)
            for j in range(first):
                blk = load_block(src, j, jnp.float32)
                _set_compute_dtype(blk, cdt)
                _fp_outputs(blk, hessians._ActFile(_acts(work, j)), _acts(work, j + 1), mesh)
                os.remove(_acts(work, j))
    for i in todo:
        t0 = time.perf_counter()
        block = load_block(src, i, jnp.float32)
        hess = hessians.load_layer_hessians(hdir, i)
        data = None
        if tuning:
            _set_compute_dtype(block, cdt)
            xf = hessians._ActFile(_acts(work, i))
            if xf.shape[:2] != windows.shape:
                raise ValueError(f"{work} holds activations for other fine-tuning windows: "
                                 "delete it and rerun")
            yf = _fp_outputs(block, xf, _acts(work, i + 1), mesh)
            w = _Windows(xf, yf, ft_cfg.train_size, ft_cfg.bs, settings.seed, i, mesh)
            data = (w.train, w.valid)
            if mesh is not None:
                from quipjax import sharding
                sharding.shard_module(block, mesh)
        groups, info = quantize_layer(block, hess, settings, i, ft_cfg, data, adapter, log,
                                      mesh=mesh)
        info["seconds"] = time.perf_counter() - t0
        ckpt.save_layer(out, i, groups, block_fp_params(block, adapter), info)
        if tuning:
            os.remove(_acts(work, i))
            if i == L - 1:
                os.remove(_acts(work, L))
        if progress:
            progress(i, info)
    if tuning and os.path.isdir(work) and not os.listdir(work):
        os.rmdir(work)


def _fp_outputs(block, xf, path, mesh=None):
    """Run the FP block over every window of xf; write the outputs to `path` (atomically).
    mesh: the windows split over its devices (one each; the same outputs)."""
    if os.path.exists(path):
        return hessians._ActFile(path)
    tmp = path + ".tmp.npy"
    yf = hessians._ActFile(tmp, xf.shape)
    if mesh is not None:
        from quipjax import sharding
        D, N = mesh.size, xf.shape[0]
        fwd = sharding.block_forward_fn(block, mesh)
        for b in range(0, N, D):
            x = np.zeros((D,) + xf.shape[1:], np.float32)
            x[:min(D, N - b)] = xf.read(b, min(b + D, N))
            yf.write(b, np.asarray(fwd(x))[:min(D, N - b)])
        os.replace(tmp, path)
        return hessians._ActFile(path)
    for b in range(xf.shape[0]):
        yf.write(b, np.asarray(evaluate.run_block(block, jnp.asarray(xf.read(b, b + 1)))))
    os.replace(tmp, path)
    return hessians._ActFile(path)


# ---------------------------------------------------------------- end to end

def tunable_model(ckpt_dir: str, meta: dict, compute_dtype=jnp.bfloat16,
                  adapter: ModelAdapter = LLAMA, head_dtype=None, mesh=None) -> tuple:
    """A Llama whose quantized linears are `TunableQuantLinear`s (float32 norms; embeddings and
    lm_head stored in `head_dtype`, default compute_dtype: float32 when they train).
    mesh: variables placed by `quipjax.sharding.RULES` block by block as they are built.
    Returns (model, {layer: {group name: QuantizedGroup}})."""
    head_dtype = head_dtype or compute_dtype
    spec = LlamaSpec.from_dict(meta["model"])
    glob = ckpt.load_globals(ckpt_dir)
    e2e = ckpt.load_e2e(ckpt_dir)
    if e2e is not None:
        glob.update(e2e[1])
    if mesh is None:
        model = Llama(spec, jnp.float32)
        model.embed_tokens = nnx.Param(jnp.asarray(glob["embed_tokens"], head_dtype))
        model.norm.weight[...] = jnp.asarray(glob["norm"], jnp.float32)
        if model.lm_head is not None:
            model.lm_head.weight = nnx.Param(jnp.asarray(glob["lm_head"], head_dtype))
    else:
        from quipjax import sharding
        model = sharding.abstract_model(spec, jnp.float32)
        sharding.put_param(model, "embed_tokens", glob["embed_tokens"], mesh, dtype=head_dtype)
        sharding.put_param(model.norm, "weight", glob["norm"], mesh, "norm.weight", jnp.float32)
        if model.lm_head is not None:
            sharding.put_param(model.lm_head, "weight", glob["lm_head"], mesh, "lm_head.weight",
                               head_dtype)
    if model.lm_head is not None:
        model.lm_head.compute_dtype = compute_dtype
    all_groups = {}
    for i in range(spec.num_layers):
        groups, norms = ckpt.load_layer_tuned(ckpt_dir, i, e2e)
        block = model.layers[i] if mesh is None else Block(spec, jnp.float32)
        for name, v in norms.items():
            set_param(block, name, v)
        for g in groups.values():
            ft.attach_tunable(block, g, compute_dtype)
        if mesh is not None:
            from quipjax import sharding
            model.layers[i] = sharding.shard_module(block, mesh)
        all_groups[i] = groups
    return model, all_groups


def finetune_e2e(ckpt_dir: str, src: CheckpointSource, ft_cfg: FTSettings, windows: np.ndarray,
                 *, adapter: ModelAdapter = LLAMA, log: Optional[Callable] = None,
                 mesh=None) -> list:
    """Tune su/sv, the norms (and the head with e2e_train_head) of the checkpoint's model to the
    FP model's next-token distribution; save the best as the checkpoint's e2e override.

    windows: (e2e_train_size + e2e_valid_size, ctx) int32. Returns the curve. mesh: student
    and teacher placed by `quipjax.sharding.RULES`, batches split over the devices.
    """
    meta = ckpt.read_meta(ckpt_dir)
    cdt = _cdt(ft_cfg.compute_dtype)
    model, groups = tunable_model(ckpt_dir, meta, cdt, adapter,
                                  head_dtype=jnp.float32 if ft_cfg.e2e_train_head else cdt,
                                  mesh=mesh)
    if mesh is None:
        teacher = load_model(src, cdt)
    else:
        from quipjax import sharding
        teacher = sharding.load_model_sharded(src, cdt, mesh)

    @nnx.jit
    def teacher_logp(teacher, tokens):
        return jax.nn.log_softmax(ft.model_forward(teacher, tokens, remat=False), -1)

    n_train, bs = ft_cfg.e2e_train_size, ft_cfg.e2e_bs

    def batch(idx):
        tok = windows[np.asarray(list(idx))]
        if mesh is not None:
            from quipjax import sharding
            tok = sharding.put_batch(tok, mesh)
        tok = jnp.asarray(tok)
        return tok, teacher_logp(teacher, tok)

    def train(epoch):
        perm = np.random.default_rng([meta["settings"]["seed"], 1 << 20, epoch]).permutation(n_train)
        for b in range(0, n_train - bs + 1, bs):
            yield batch(perm[b:b + bs])

    def valid():
        for b in range(n_train, len(windows), bs):
            yield batch(range(b, min(b + bs, len(windows))))

    head = "embed_tokens" if model.lm_head is None else "lm_head"
    trainable = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("embed_tokens")),
                        nnx.Not(nnx.PathContains("lm_head")))
    if ft_cfg.e2e_train_head:
        trainable = nnx.All(nnx.Param, nnx.Any(trainable, nnx.PathContains(head)))
    tc = ft.TuneConfig(epochs=ft_cfg.e2e_epochs, lr=ft_cfg.e2e_lr, susv_lr=ft_cfg.e2e_susv_lr,
                       batch_size=bs, update_freq=ft_cfg.e2e_update_freq,
                       early_stop=ft_cfg.e2e_early_stop)

    def prog(c):
        if log:
            tr = "" if c["train"] is None else f"train KL {c['train']:.4f}, "
            log(f"e2e epoch {c['epoch']}: {tr}valid KL {c['valid']:.4f} ({c['seconds']:.0f} s)")
    curve = ft.tune(model, ft.distill_kl, train, valid, tc, trainable=trainable, progress=prog)

    layers = []
    for i, block in enumerate(model.layers):
        tuned = {k: ft.detach_tunable(block, g) for k, g in groups[i].items()}
        layers.append({"groups": {k: (g.ql.SU, g.ql.SV) for k, g in tuned.items()},
                       "norms": block_fp_params(block, adapter)})
    glob = {"norm": np.asarray(model.norm.weight[...])}
    if ft_cfg.e2e_train_head:
        glob[head] = np.asarray((model.embed_tokens if head == "embed_tokens"
                                 else model.lm_head.weight)[...])
    ckpt.save_e2e(ckpt_dir, layers, glob, {"curve": curve})
    return curve
