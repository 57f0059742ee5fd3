"""Bad input to the command-line scripts, table-driven: each case runs the real script in its
own process (tests/cli_runner.py forks one per case) and asserts the exit status, one line
on stderr naming the problem (and the file or layer where there is one), no traceback, and
that nothing outside the case's output directory changed."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from helpers import TINY, make_hf_folder

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
EXP = os.path.join(ROOT, "experiments")
Q, E, G, P, C, X = (os.path.join(EXP, s) for s in (
    "quantize.py", "eval_ppl.py", "generate.py", "plan.py", "convert.py",
    "compare_checkpoints.py"))


def _folders(root):
    """The inputs of the cases under root (a fresh tmp dir). Returns {name: path}."""
    import dataclasses
    f = {"tiny": os.path.join(root, "tiny")}
    make_hf_folder(f["tiny"])
    f["odd"] = os.path.join(root, "odd_dims")               # down_proj input 100: not 8k
    make_hf_folder(f["odd"], spec=dataclasses.replace(TINY, intermediate_size=100))
    f["bigvocab"] = os.path.join(root, "bigvocab")          # tokenizer ids up to 63, vocab 32
    make_hf_folder(f["bigvocab"], spec=dataclasses.replace(TINY, vocab_size=32))
    shutil.copy(os.path.join(f["tiny"], "tokenizer.json"), f["bigvocab"])
    for name, edit in (("badcfg", "config"), ("listcfg", "list"), ("notok", "tok"),
                       ("trunc", "trunc")):
        f[name] = os.path.join(root, name)
        shutil.copytree(f["tiny"], f[name])
        if edit == "config":
            with open(os.path.join(f[name], "config.json"), "w") as h:
                h.write('{"model_type": "llama", "hidden_size": ')
        elif edit == "list":
            with open(os.path.join(f[name], "config.json"), "w") as h:
                h.write("[1, 2]")
        elif edit == "tok":
            os.remove(os.path.join(f[name], "tokenizer.json"))
            os.remove(os.path.join(f[name], "tokenizer_config.json"))
        else:
            shard = os.path.join(f[name], "model-00002-of-00002.safetensors")
            with open(shard, "r+b") as h:
                h.truncate(os.path.getsize(shard) - 100)
    f["binary"] = os.path.join(root, "binary.txt")
    with open(f["binary"], "wb") as h:
        h.write(b"\x00\x01\x02 the of and" * 50)
    f["latin1"] = os.path.join(root, "latin1.txt")
    with open(f["latin1"], "wb") as h:
        h.write("caf\u00e9 the of and ".encode("latin-1") * 50)
    f["notmodel"] = f["latin1"]
    f["calib"] = os.path.join(root, "calib.txt")            # 20,000 tokens of the tiny model
    with open(f["calib"], "w") as h:
        h.write("the of and in " * 5000)
    f["calib_jsonl"] = os.path.join(root, "calib.jsonl")
    with open(f["calib_jsonl"], "w") as h:
        h.write('{"text": "the of and"}\n' * 10)
    f["foreign"] = os.path.join(root, "foreign_dir")        # someone else's directory
    os.makedirs(f["foreign"])
    with open(os.path.join(f["foreign"], "notes.txt"), "w") as h:
        h.write("mine")
    return f


# (id, script, args, status, substrings of the one stderr line); {name} = a fixture path,
# {out} = the case's own output directory (must not be created by a refused run)
CASES = [
    ("q_positional", Q, ["{tiny}"], 2, ["unexpected argument", "--model={tiny}"]),
    ("q_scale", Q, ["--model={tiny}", "--scale=-1"], 2, ["--scale", "-1"]),
    ("q_devset0", Q, ["--model={tiny}", "--devset_size=0"], 2, ["--devset_size", "0"]),
    ("q_ctx0", Q, ["--model={tiny}", "--ctx_size=0"], 2, ["--ctx_size"]),
    ("q_evalctx1", Q, ["--model={tiny}", "--eval_ctx_size=1"], 2, ["--eval_ctx_size"]),
    ("q_batch0", Q, ["--model={tiny}", "--batch_size=0"], 2, ["--batch_size"]),
    ("q_sigma", Q, ["--model={tiny}", "--sigma_reg=-1"], 2, ["sigma_reg"]),
    ("q_tune_iters", Q, ["--model={tiny}", "--tune_iters=-1"], 2, ["--tune_iters"]),
    ("q_codebook", Q, ["--model={tiny}", "--codebook=E9"], 2, ["codebook", "E9"]),
    ("q_unknown_flag", Q, ["--model={tiny}", "--nosuchflag=1"], 2, ["nosuchflag"]),
    ("q_dtype", Q, ["--model={tiny}", "--dtype=float16"], 2, ["dtype", "float16"]),
    ("q_shards0", Q, ["--model={tiny}", "--hessian_shards=0"], 2, ["--hessian_shards"]),
    ("q_ft_bs", Q, ["--model={tiny}", "--ft_epochs=1", "--ft_bs=0"], 2, ["--ft_bs"]),
    ("q_ft_ctx", Q, ["--model={tiny}", "--ft_ctx_size=0"], 2, ["--ft_ctx_size"]),
    ("q_e2e_train", Q, ["--model={tiny}", "--e2e_epochs=1", "--e2e_train_size=2"], 2,
     ["--e2e_train_size"]),
    ("q_eval_set", Q, ["--model={tiny}", "--eval_datasets=wiki,books"], 2, ["books"]),
    ("q_no_model", Q, ["--model={root}/nothing"], 2, ["nothing", "does not exist"]),
    ("q_not_model", Q, ["--model={notmodel}"], 2, ["latin1.txt", "neither"]),
    ("q_bad_config", Q, ["--model={badcfg}"], 2, ["badcfg/config.json", "not valid JSON"]),
    ("q_list_config", Q, ["--model={listcfg}"], 2, ["listcfg/config.json"]),
    ("q_no_tokenizer", Q, ["--model={notok}"], 2, ["no tokenizer.json", "notok"]),
    ("q_truncated", Q, ["--model={trunc}"], 2, ["model-00002-of-00002.safetensors",
                                                "truncated"]),
    ("q_odd_dims", Q, ["--model={odd}"], 2, ["mlp.down_proj", "100", "multiple of 8"]),
    ("q_text_binary", Q, ["--model={tiny}", "--text_file={binary}"], 2, ["binary.txt",
                                                                         "binary"]),
    ("q_text_latin1", Q, ["--model={tiny}", "--text_file={latin1}"], 2, ["latin1.txt",
                                                                         "UTF-8"]),
    ("q_text_missing", Q, ["--model={tiny}", "--text_file={root}/none.txt"], 2,
     ["none.txt", "does not exist"]),
    ("q_mesh", Q, ["--model={tiny}", "--mesh=data:3"], 2, ["data:3"]),
    ("q_flagfile_missing", Q, ["--flagfile=nosuch.cfg"], 2, ["flagfile", "nosuch.cfg"]),
    ("q_flagfile_needs_model", Q, ["--flagfile=llama7b_2bit"], 2, ["Llama-2-7B", "--model"]),
    ("q_flagfile_70b", Q, ["--flagfile=llama70b_2bit.cfg"], 2, ["Llama-2-70B", "--model"]),
    ("q_foreign_out", Q, ["--model={tiny}", "--output_dir={foreign}"], 2,
     ["foreign_dir", "not a quipjax run", "notes.txt"]),
    ("q_foreign_overwrite", Q, ["--model={tiny}", "--output_dir={foreign}", "--overwrite"], 2,
     ["foreign_dir", "not a quipjax run"]),
    ("q_big_vocab", Q, ["--model={bigvocab}", "--noeval", "--devset_size=1",
                        "--ctx_size=32"], 2, ["vocabulary", "32"]),
    ("q_calib_wiki_too_many", Q, ["--model={tiny}", "--devset_size=6000", "--ctx_size=64"], 2,
     ["wiki calibration split", "384,000 tokens", "322,605 distinct", "--allow_repeats"]),
    ("q_calib_files_7b", Q, ["--flagfile=llama7b_2bit", "--model={tiny}", "--noallow_repeats",
                             "--calibration_files={calib}", "--output_dir={out}"], 2,
     ["calib.txt", "15,728,640 tokens", "6144 Hessian windows x 2048", "20,000 distinct",
      "--devset_size", "--allow_repeats"]),
    ("q_calib_field", Q, ["--model={tiny}", "--calibration_files={calib_jsonl}",
                          "--calibration_field=body"], 2,
     ["calib.jsonl line 1 has no field 'body'", "--calibration_field"]),
    ("q_calib_no_match", Q, ["--model={tiny}", "--calibration_files={root}/none/*.txt"], 2,
     ["none/*.txt", "matches no file"]),
    ("q_calib_weight", Q, ["--model={tiny}", "--calibration_files={calib}:0"], 2,
     ["calib.txt", "positive number"]),
    ("q_calib_both", Q, ["--model={tiny}", "--calibration=mix", "--calibration_files={calib}"],
     2, ["--calibration=mix", "exclude each other"]),
    ("q_calib_source", Q, ["--model={tiny}", "--calibration=books"], 2, ["books"]),
    ("e_positional", E, ["{tiny}"], 2, ["unexpected argument", "--model={tiny}"]),
    ("e_ctx0", E, ["--model={tiny}", "--ctx_size=0"], 2, ["--ctx_size"]),
    ("e_windows0", E, ["--model={tiny}", "--max_windows=0"], 2, ["window"]),
    ("e_no_checkpoint", E, ["--checkpoint={root}/nockpt"], 2, ["nockpt"]),
    ("e_foreign_checkpoint", E, ["--checkpoint={foreign}"], 2, ["foreign_dir",
                                                                "not a quipjax checkpoint"]),
    ("e_text_latin1", E, ["--model={tiny}", "--text_file={latin1}"], 2, ["latin1.txt",
                                                                         "UTF-8"]),
    ("e_big_vocab", E, ["--model={bigvocab}", "--ctx_size=64", "--max_windows=8",
                        "--dataset=wiki"], 2, ["vocabulary", "32"]),
    ("g_positional", G, ["hello there"], 2, ["unexpected argument", "--prompt=hello there"]),
    ("g_temperature", G, ["--model={tiny}", "--temperature=-1"], 2, ["temperature"]),
    ("g_top_p", G, ["--model={tiny}", "--top_p=2"], 2, ["top_p"]),
    ("g_new_tokens", G, ["--model={tiny}", "--max_new_tokens=0"], 2, ["max_new_tokens"]),
    ("p_positional", P, ["{tiny}/config.json"], 2, ["unexpected argument", "--model="]),
    ("p_bad_config", P, ["--model={badcfg}"], 2, ["config.json"]),
    ("p_odd_dims", P, ["--model={odd}"], 2, ["mlp.down_proj", "100"]),
    ("p_needs_model", P, ["--flagfile=llama70b_2bit"], 2, ["Llama-2-70B"]),
    ("c_missing_flags", C, [], 2, ["--to"]),
    ("x_missing_flags", X, ["--a={tiny}"], 2, ["--b"]),
] + [(f"help_{os.path.basename(s)[:-3]}", s, ["--help"], 0, []) for s in (Q, E, G, P, C, X)]


STARTED = {"q_big_vocab"}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cli"))
    inputs = os.path.join(root, "inputs")
    f = _folders(inputs)
    f["root"] = inputs
    cases = []
    for cid, script, args, _, _ in CASES:
        cwd = os.path.join(root, "cwd", cid)        # relative defaults (runs/...) land here
        os.makedirs(cwd)
        out = os.path.join(root, "out", cid)
        args = [a.format(out=out, **f) for a in args]
        if script == Q and not any(a.startswith(("--output_dir", "--flagfile")) for a in args):
            args.append(f"--output_dir={out}")
        cases.append({"script": script, "args": args, "cwd": cwd, "watch": inputs})
    env = dict(os.environ, QUIPJAX_CACHE=os.path.join(root, "cache"))
    before = _snapshot(inputs)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "cli_runner.py")],
                       input=json.dumps(cases), capture_output=True, text=True, env=env,
                       cwd=root, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    return {c[0]: dict(x, args=cs["args"], before=before, root=root,
                       fmt=lambda s: s.format(**f))
            for c, cs, x in zip(CASES, cases, res)}


def _snapshot(root):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from cli_runner import snapshot
    return snapshot(root)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_one_line_exit_status(results, case):
    cid, script, _, status, needles = case
    r = results[cid]
    where = f"{os.path.basename(script)} {' '.join(r['args'])}\nstderr:\n{r['err'][-2000:]}"
    assert r["rc"] == status, where
    assert "Traceback" not in r["err"], where
    # nothing outside the output directory changed: the inputs are as they were
    assert r["after"] == r["before"], where
    out = os.path.join(r["root"], "out", cid)
    if status == 0:
        assert r["out"].strip(), where                       # --help printed something
        return
    lines = [ln for ln in r["err"].splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), where
    for n in needles:
        assert r["fmt"](n) in lines[0], (n, where)
    # a refused run leaves no output directory, no default one (runs/ under its cwd); the
    # token ids are only seen once the run has started
    if cid not in STARTED:
        assert not os.path.exists(out), where
    assert not os.path.exists(os.path.join(r["root"], "cwd", cid, "runs")), where
    assert "NaN" not in r["out"], where
