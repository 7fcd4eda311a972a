"""A ladder through a real ComfyUI server: the tiny twin of seed 003 (TeaCache and the 4-step LoRAs
among its rows), the server's caches freed before each row, every row's nodes run anew, and the
rows that cannot run on the server listed with their reasons."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from wanbench.cli import main
from wanbench.profiling import check_report, load_runs

from .server import ComfyServer

pytestmark = pytest.mark.e2e


def test_seed003_tiny_ladder_on_a_server(comfy_server: ComfyServer, tmp_path: Path, capsys) -> None:
    out = tmp_path / "ladder"
    code = main(["suite", "seed003_ladder_tiny.json", "--server", comfy_server.url, "--out", str(out)])
    assert code == 0, capsys.readouterr().out
    doc = json.loads((out / "seed003_ladder_tiny_ladder.json").read_text(encoding="utf-8"))
    rows = {r["id"]: r for r in doc["rows"]}
    statuses = {k: r["status"] for k, r in rows.items()}
    assert statuses == {
        "00_official_style_baseline": "measured",
        "01_lightx2v_1_sageattention": "skipped",
        "02_lightx2v_2_unified_bf16": "skipped",
        "03_lightx2v_3_fp8_tiled_vae": "skipped",
        "04_lightx2v_4_teacache_0_2": "measured",
        "05_lightx2v_4_distill_4_step_distilled_lora": "measured",
    }
    assert f"the server {comfy_server.url}" in rows["01_lightx2v_1_sageattention"]["reason"]
    assert doc["execution"].startswith(f"in order on the ComfyUI server {comfy_server.url}")
    for row in rows.values():
        if row["status"] != "measured":
            continue
        run = load_runs(out / row["report"])[0]
        assert run.context.case_name == row["id"]
        assert not any(s.cached for s in run.stages), f"{row['id']}: a stage was served from ComfyUI's cache"
        assert (out / row["video"]).is_file() and (out / row["latent"]).is_file()
    distill = rows["05_lightx2v_4_distill_4_step_distilled_lora"]
    assert load_runs(out / distill["report"])[0].context.solver == "euler_distill"
    assert distill["derived"]["work_ratio"] < 1.0 and distill["deviation"]["latent_rel_l2"] > 0
    cached = load_runs(out / rows["04_lightx2v_4_teacache_0_2"]["report"])[0]
    assert cached.context.step_cache.startswith("teacache, threshold 1.5")
    assert check_report(out / "seed003_ladder_tiny_ladder.json") == []  # (each row posted /free first: a
    # refusal would have failed the row)
