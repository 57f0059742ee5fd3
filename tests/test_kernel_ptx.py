"""experiments/kernel_ptx.py's loop counter (the figure behind "instructions per weight"): on
hand-written PTX and SASS listings it finds the loop (a branch back to an earlier label or
address) and counts its instructions, without directives, comments, labels or SASS NOPs."""
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

PTX = """
.visible .entry k(
	.param .u64 k_param_0
)
{
	.reg .b32 	%r<9>;
	mov.u32 	%r1, 0;
$L__BB0_1:
	add.s32 	%r1, %r1, 1;
	setp.ge.s32 	%p1, %r1, 8;
	@%p1 bra 	$L__BB0_3;
	bra.uni 	$L__BB0_2;
$L__BB0_2:
	// a comment line
	mul.lo.s32 	%r2, %r1, 3;
	ld.global.u16 	%rs1, [%rd1];
	bra.uni 	$L__BB0_1;
$L__BB0_3:
	ret;
$L__BB0_4:
	bra.uni 	$L__BB0_4;
}
"""

SASS = """
        code for sm_90a
        /*0000*/                   MOV R1, c[0x0][0x28] ;              /* 0x00000a0000017a02 */
        /*0010*/                   IADD3 R2, R1, 0x1, RZ ;             /* 0x0000000101027810 */
        /*0020*/                   NOP ;                               /* 0x0000000000007918 */
        /*0030*/                   FFMA R3, R2, R2, R3 ;               /* 0x0000000202037223 */
        /*0040*/              @!P0 BRA 0x10 ;                          /* 0xfffffffc00fc7947 */
        /*0050*/                   EXIT ;                              /* 0x000000000000794d */
        /*0060*/                   BRA 0x60;                           /* 0xfffffffc00fc7947 */
"""


def test_loop_instructions_of_ptx_and_sass():
    script = f"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("kernel_ptx", {os.path.join(HERE, "..", "experiments", "kernel_ptx.py")!r})
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
print(json.dumps([m.loop_instructions({PTX!r}), m.loop_instructions({SASS!r}, sass=True),
                  m.loop_instructions("mov.u32 %r1, 0;")]))
"""
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    ptx, sass, none = json.loads(p.stdout.strip().splitlines()[-1])
    # add, setp, @p bra, bra.uni, mul, ld, bra.uni: the 2-instruction self loop is smaller
    assert ptx == {"instructions": 7, "opcodes": {
        "add.s32": 1, "setp.ge.s32": 1, "bra": 1, "bra.uni": 2, "mul.lo.s32": 1,
        "ld.global.u16": 1}}
    # IADD3, FFMA, BRA from 0x10 to 0x40 (NOP not counted; BRA 0x60 is not backwards)
    assert sass == {"instructions": 3, "opcodes": {"IADD3": 1, "FFMA": 1, "BRA": 1}}
    assert none == {}
