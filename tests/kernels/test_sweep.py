"""kernels.sweep runs end to end (interpreter, tiny shapes): every candidate launch shape is checked."""

from kernels import sweep


def test_sweep_smoke_checks_every_candidate(capsys):
    assert sweep.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert out.count("<- fastest") == 4  # one prefill case and three page cases, each with a winner
    assert "m16 n32 w4 s1" in out and "elems   256 warps 2" in out
