"""`bench frontier` on a tiny random Llama: one harvest, several methods × sparsities, resumable results."""

import json

from featurekit.bench.frontier import FrontierConfig, run_frontier


def test_frontier_rows_files_and_resume(tiny, tmp_path):
    fc = FrontierConfig(model=str(tiny / "model"), site="resid_post.1", source=str(tiny / "text.txt"), train_tokens=3000,
                        epochs=2, latents=64, batch_size=256, ks=[2, 6], methods=["topk", "relu", "gsae"], eval_tokens=600,
                        splice_contexts=8)
    lines = []
    result = run_frontier(fc, tmp_path / "f", log=lines.append)
    rows = result["rows"]
    assert [(r["method"], r["value"]) for r in rows] == [("topk", 2), ("topk", 6), ("relu", 2.0), ("relu", 5.0), ("relu", 12.0),
                                                          ("gsae", 2), ("gsae", 6)]
    assert all("error" not in r for r in rows), [r.get("error") for r in rows]
    topk = {r["value"]: r for r in rows if r["method"] == "topk"}
    assert topk[2]["l0"] <= 2 < topk[6]["l0"] <= 6 and topk[6]["fvu"] < topk[2]["fvu"]  # more latents, better fit
    assert all(0 < r["fvu"] < 1.5 and r["kl_clean_spliced"] >= 0 and "loss_recovered" in r for r in rows)
    out = tmp_path / "f"
    assert (out / "frontier.png").stat().st_size > 0 and (out / "frontier.svg").is_file()
    assert "| topk | k=2 |" in (out / "results.md").read_text()
    assert not (out / "topk-k2").exists()  # dictionaries are removed after scoring
    # a second run with the same options keeps every finished row and trains nothing
    lines.clear()
    again = run_frontier(fc, out, log=lines.append)
    assert again["rows"] == json.loads((out / "results.json").read_text())["rows"] == rows and len(lines) == 1
