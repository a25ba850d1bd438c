"""The games dataset on disk: round trip, resume after an interrupted build, damaged files named."""

import json

import pytest

from featurekit.errors import FeaturekitError
from featurekit.moex.chess.dataset import build_dataset, load_token_stream, read_games, read_manifest
from featurekit.moex.chess.engine import stockfish_available
from featurekit.moex.chess.games import GameSpec, generate_games
from featurekit.moex.chess.pgn import decode

SPEC = GameSpec(max_chars=120)


def test_round_trip(tmp_path):
    build_dataset(tmp_path, seed=5, count=7, spec=SPEC, shard_size=3)
    games = read_games(tmp_path)
    assert games == list(generate_games(5, 7, SPEC))
    m = read_manifest(tmp_path)
    assert m["complete"] and m["n_games"] == 7 and len(m["shards"]) == 3 and m["n_chars"] == sum(map(len, games))
    assert m["seed"] == 5 and m["spec"]["max_chars"] == 120 and m["deterministic"]
    assert decode(load_token_stream(tmp_path)) == "".join(games)
    build_dataset(tmp_path, seed=5, count=7, spec=SPEC, shard_size=3)  # already complete: a no-op


def test_resume_after_an_interrupted_build(tmp_path):
    build_dataset(tmp_path, seed=2, count=6, spec=SPEC, shard_size=2)
    whole = read_games(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    # as if killed after the first shard: the manifest says incomplete, later shards absent
    manifest.update(complete=False, shards=manifest["shards"][:1])
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    for name in ("games-00001.txt", "games-00002.txt"):
        (tmp_path / name).unlink()
    with pytest.raises(FeaturekitError, match="interrupted"):
        read_games(tmp_path)
    build_dataset(tmp_path, seed=2, count=6, spec=SPEC, shard_size=2)
    assert read_games(tmp_path) == whole


def test_other_settings_and_damage_are_refused(tmp_path):
    build_dataset(tmp_path, seed=1, count=2, spec=SPEC)
    with pytest.raises(FeaturekitError, match="other settings"):
        build_dataset(tmp_path, seed=2, count=2, spec=SPEC)
    shard = tmp_path / "games-00000.txt"
    shard.write_text(shard.read_text().replace("1.", "1.", 1) + ";1.e4\n")
    with pytest.raises(FeaturekitError, match="sha256"):
        read_games(tmp_path)
    with pytest.raises(FeaturekitError, match="not a finished chess dataset"):
        read_games(tmp_path / "nowhere")


@pytest.mark.skipif(not stockfish_available(), reason="no stockfish binary (apt-get install stockfish)")
def test_a_stockfish_dataset_records_the_engine_and_resumes_to_the_same_bytes(tmp_path):
    spec = GameSpec(policy="stockfish", stockfish_nodes=50, max_chars=120)
    build_dataset(tmp_path / "a", seed=3, count=4, spec=spec, shard_size=2)
    manifest = read_manifest(tmp_path / "a")
    assert manifest["engine"].startswith("Stockfish") and manifest["spec"]["policy"] == "stockfish"
    whole = (tmp_path / "a" / "games-00001.txt").read_bytes()
    manifest.update(complete=False, shards=manifest["shards"][:1])  # as if killed after the first shard
    (tmp_path / "a" / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "a" / "games-00001.txt").unlink()
    build_dataset(tmp_path / "a", seed=3, count=4, spec=spec, shard_size=2)
    assert (tmp_path / "a" / "games-00001.txt").read_bytes() == whole
