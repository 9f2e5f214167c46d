"""exp-006 measures each side in the memory state it names: fresh memory faults in every
page of the restored cache, reused memory (what a process recycles) almost none."""

from __future__ import annotations

from semantic_cli.bench import gather


def test_exp_006_restores_into_the_memory_state_it_reports(home):
    res = gather.run(tokens=1024, runs=5)
    r = res.results
    pages = r["bytes"] // 4096  # 47 MB of KV arrays at 1,024 tokens
    faults = r["minor_faults_p50"]
    assert faults["restore_fresh"] >= 0.9 * pages  # new pages: each faults (or is populated) once
    assert faults["restore"] <= 0.05 * pages  # recycled: mapped already
    # numpy asks for transparent huge pages for arrays this large: a fault per 2 MB at least
    assert faults["copy_fresh"] >= pages / 512 and faults["copy_reused"] <= 0.05 * pages
    assert r["p95_over_copy"] == r["restore_s"]["p95"] / r["copy_reused_s"]["p50"]
    assert r["meets_target"] == (r["p95_over_copy"] <= gather.TARGET_P95_OVER_COPY)
    assert set(res.samples["minor_faults"]) == {"restore", "restore_fresh", "copy_fresh", "copy_reused"}
