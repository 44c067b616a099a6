"""launch/continue_quality.py: the seam at the join of a continued clip, scored as BENCHMARKS.md reports it."""

import json

import pytest
from conftest import ROOT, launch_script

from ds_dualparal.config import load_config
from ds_dualparal.toy import quality


def runner():
    return launch_script("continue_quality.py")


def test_the_join_is_the_first_block_boundary_of_a_continuation(tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"latents": torch.zeros(1, 16, 6, 8, 8)}, str(tmp_path / "clip.safetensors"))
    cfg = load_config(ROOT / "ds_configs" / "tiny.json", dict(num_frames=41)).dualparal
    assert runner().boundaries_of(cfg) == quality.block_boundaries(41, 2, 1) == [9, 17, 25, 33]
    continued = cfg.with_overrides(continue_from=str(tmp_path / "clip.safetensors"))
    assert runner().boundaries_of(continued) == [21, 33]  # the join (after the clip's 21 frames), then block 1


def test_a_tiny_run_scores_every_row(tmp_path, capsys):
    out = tmp_path / "q.json"
    assert runner().main(["--clip-frames", "9", "--frames", "25", "--steps", "2", "--prompts", "1", "--seeds", "0",
                          "--out", str(out)]) == 0
    document = json.loads(out.read_text())
    rows = document["rows"]
    assert [(r["video"], r["at"]) for r in rows] == list(runner().ROWS)
    assert all(r["seam_ratio"] > 0 for r in rows)
    mp4 = rows[-1]
    assert mp4["latents_relative_l2"] > 0 and mp4["frames_mean_abs"] > 0 and mp4["x264_mean_abs"] >= 0
    assert "| continued latents | the join | 1 |" in capsys.readouterr().out


@pytest.mark.parametrize("flags", [["--frames", "20"], ["--clip-frames", "21", "--frames", "21"], ["--seeds", "a"],
                                   ["--prompts", "9"], ["--steps", "0"]])
def test_bad_flags_exit_2(flags, capsys):
    with pytest.raises(SystemExit) as exit:
        runner().parse_args(flags)
    assert exit.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("launch/continue_quality.py: error:")
