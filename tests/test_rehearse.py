"""experiments/rehearse.py on its tiny shape: the whole pipeline through the CLI, killed with
SIGKILL in the Hessian stage and in quantization, resumed, and its first layers compared with
an uninterrupted run of a model cut after them (the 7B-shaped rehearsal's own check)."""
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def test_tiny_rehearsal_killed_twice_resumes_to_the_reference_bits(tmp_path):
    work = tmp_path / "rehearsal"
    p = subprocess.run([sys.executable, os.path.join(HERE, "..", "experiments", "rehearse.py"),
                        "--shape=tiny", f"--work={work}", "--max_rss_gb=4"],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "rehearsal passed" in p.stdout
    r = json.load(open(work / "rehearsal.json"))
    inv = r["invocations"]
    assert [(i["until"], i["killed"], i["status"]) for i in inv] == [
        ("hessians", True, -9), ("quantize", True, -9), ("to the end", False, 0)]
    n_c, d_c = r["compared"]["checkpoint"]
    n_h, d_h = r["compared"]["hessians"]
    # 2 layers x 4 groups x (codes, SU, SV, scales) + 2 x 2 norms + 3 globals; 2 layers' Hessians
    assert (n_c, d_c) == (2 * 4 * 4 + 2 * 2 + 3, []) and n_h > 0 and d_h == []
    # the killed invocations' finished stages are kept (stages.jsonl), the last one's too
    assert [s["stage"] for s in inv[0]["stages"]] == ["fp_eval", "calibration_data"]
    assert "hessians" in [s["stage"] for s in inv[1]["stages"]]
    assert [s["stage"] for s in inv[2]["stages"]][-2:] == ["quantize", "quantized_eval"]
    assert all(0.05 < s["peak_rss_gb"] < 4 for i in inv for s in i["stages"])
    assert set(r["ppl"]) == {"fp", "quantized"} and r["ppl"]["quantized"]["eval_one_window.txt"] > 1
