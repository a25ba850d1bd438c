"""The on-disk activation cache: round trip, resume, corruption and version errors."""

import json
import re

import pytest
import torch

from featurekit.data.batch import ActivationBatch
from featurekit.data.cache import MANIFEST, ActivationCache, write_cache
from featurekit.errors import FeaturekitError

DIMS = {"resid_post.1": 6, "mlp_out.0": 3}
META = {"model": "tiny", "sites": sorted(DIMS), "dtype": "float32", "d": DIMS, "context_len": 8,
        "mask": {"exclude_first": True, "exclude_special": True}}


def make_batches(sizes=(5, 9, 1, 13, 4, 11, 7), dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out, start = [], 0
    for n in sizes:
        idx = torch.arange(start, start + n)
        acts = {s: torch.randn(n, d, generator=gen).to(dtype) for s, d in DIMS.items()}
        out.append(ActivationBatch(acts=acts, token_ids=idx * 7 % 101, context_idx=idx // 8, position=idx % 8))
        start += n
    return out


def concat(batches):
    return (
        {s: torch.cat([b.acts[s] for b in batches]) for s in batches[0].acts},
        {k: torch.cat([getattr(b, k) for b in batches]) for k in ("token_ids", "context_idx", "position")},
    )


def assert_same(batches_a, batches_b):
    acts_a, idx_a = concat(batches_a)
    acts_b, idx_b = concat(batches_b)
    assert acts_a.keys() == acts_b.keys()
    for s in acts_a:
        assert acts_a[s].dtype == acts_b[s].dtype and torch.equal(acts_a[s], acts_b[s])
    for k in idx_a:
        assert idx_b[k].dtype == torch.int64 and torch.equal(idx_a[k], idx_b[k])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bitwise(tmp_path, dtype):
    batches = make_batches(dtype=dtype)
    cache = write_cache(tmp_path / "c", iter(batches), META, shard_tokens=10)
    assert cache.complete and cache.n_tokens == 50 and cache.n_shards == 5
    assert [s["n_tokens"] for s in cache.manifest["shards"]] == [10] * 5
    assert cache.sites == sorted(DIMS) and cache.d("resid_post.1") == 6 and cache.d("mlp_out.0") == 3
    assert cache.manifest["meta"] == META and cache.manifest["format_version"] == 1
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [MANIFEST] + [f"shard_0000{i}.safetensors" for i in range(5)]
    reread = ActivationCache(tmp_path / "c")
    assert_same(batches, list(reread.iter_shards()))
    assert_same(batches, list(reread.iter_shards(verify=False)))


def test_last_shard_smaller_order_and_site_selection(tmp_path):
    batches = make_batches()
    cache = write_cache(tmp_path, batches, META, shard_tokens=16)
    assert [s["n_tokens"] for s in cache.manifest["shards"]] == [16, 16, 16, 2]
    shards = list(cache.iter_shards())
    reordered = list(cache.iter_shards(order=[3, 0, 2, 1], sites=["mlp_out.0"]))
    assert [b.n_tokens for b in reordered] == [2, 16, 16, 16]
    assert list(reordered[0].acts) == ["mlp_out.0"]
    assert torch.equal(reordered[1].acts["mlp_out.0"], shards[0].acts["mlp_out.0"])
    assert torch.equal(reordered[0].token_ids, shards[3].token_ids)
    with pytest.raises(FeaturekitError, match="not in the cache"):
        next(cache.iter_shards(sites=["resid_post.9"]))
    with pytest.raises(FeaturekitError, match="out of range"):
        next(cache.iter_shards(order=[4]))


def interrupted(batches, after_tokens):
    """Yield batches until `after_tokens` have gone out, then fail like a crash."""
    sent = 0
    for b in batches:
        yield b
        sent += b.n_tokens
        if sent >= after_tokens:
            raise RuntimeError("simulated crash")


def shard_stats(directory):
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_ino, p.read_bytes())
            for p in sorted(directory.glob("shard_*.safetensors"))}


def test_resume_after_interruption_equals_uninterrupted(tmp_path):
    batches = make_batches()
    whole = write_cache(tmp_path / "whole", batches, META, shard_tokens=10)

    part = tmp_path / "part"
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_cache(part, interrupted(batches, 27), META, shard_tokens=10)
    first = ActivationCache(part)
    assert first.n_shards == 2 and not first.complete
    before = shard_stats(part)

    resumed = write_cache(part, batches, META, shard_tokens=10)
    after = shard_stats(part)
    assert all(after[name] == before[name] for name in before)  # no shard rewritten
    assert resumed.complete
    assert [s["sha256"] for s in resumed.manifest["shards"]] == [s["sha256"] for s in whole.manifest["shards"]]
    assert_same(list(whole.iter_shards()), list(resumed.iter_shards()))


def test_complete_cache_is_not_rewritten_or_reread(tmp_path):
    write_cache(tmp_path, make_batches(), META, shard_tokens=10)
    before = shard_stats(tmp_path)

    def must_not_be_read():
        raise AssertionError("a complete cache read its batches again")
        yield

    assert write_cache(tmp_path, must_not_be_read(), META, shard_tokens=10).n_tokens == 50
    assert shard_stats(tmp_path) == before


def test_deleted_shard_is_rewritten_on_resume(tmp_path):
    batches = make_batches()
    whole = write_cache(tmp_path, batches, META, shard_tokens=10)
    shas = [s["sha256"] for s in whole.manifest["shards"]]
    (tmp_path / "shard_00003.safetensors").unlink()
    before = shard_stats(tmp_path)
    resumed = write_cache(tmp_path, batches, META, shard_tokens=10)
    assert [s["sha256"] for s in resumed.manifest["shards"]] == shas
    after = shard_stats(tmp_path)
    assert all(after[f"shard_0000{i}.safetensors"] == before[f"shard_0000{i}.safetensors"] for i in range(3))


def test_resume_with_other_meta_or_fewer_tokens_fails(tmp_path):
    batches = make_batches()
    with pytest.raises(RuntimeError):
        write_cache(tmp_path, interrupted(batches, 27), META, shard_tokens=10)
    with pytest.raises(FeaturekitError, match=r"different settings.*context_len"):
        write_cache(tmp_path, batches, {**META, "context_len": 16}, shard_tokens=10)
    with pytest.raises(FeaturekitError, match="fewer tokens"):
        write_cache(tmp_path, batches[:2], META, shard_tokens=10)


def test_truncated_shard_is_named(tmp_path):
    cache = write_cache(tmp_path, make_batches(), META, shard_tokens=10)
    path = tmp_path / "shard_00002.safetensors"
    path.write_bytes(path.read_bytes()[:-40])
    for verify in (True, False):
        with pytest.raises(FeaturekitError, match=r"shard_00002\.safetensors.*Delete"):
            list(cache.iter_shards(verify=verify))
    path.write_bytes(b"\x05")
    with pytest.raises(FeaturekitError, match=r"shard_00002\.safetensors"):
        list(cache.iter_shards(verify=False))


def test_flipped_byte_fails_the_checksum(tmp_path):
    cache = write_cache(tmp_path, make_batches(), META, shard_tokens=10)
    path = tmp_path / "shard_00001.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(FeaturekitError, match=r"shard_00001\.safetensors.*sha256"):
        list(cache.iter_shards())


def test_missing_manifest_and_newer_version(tmp_path):
    with pytest.raises(FeaturekitError, match="manifest.json is missing"):
        ActivationCache(tmp_path)
    write_cache(tmp_path, make_batches(), META, shard_tokens=10)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    manifest["format_version"] = 99
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(FeaturekitError, match="format version 99.*upgrade featurekit"):
        ActivationCache(tmp_path)


def test_bad_input(tmp_path):
    with pytest.raises(FeaturekitError, match="no tokens to cache"):
        write_cache(tmp_path / "a", [], META, shard_tokens=10)
    batches = make_batches(sizes=(4, 4))
    batches[1].acts.pop("mlp_out.0")
    with pytest.raises(FeaturekitError, match="same sites"):
        write_cache(tmp_path / "b", batches, META, shard_tokens=3)
    with pytest.raises(FeaturekitError, match="JSON"):
        write_cache(tmp_path / "c", make_batches(), {"model": object()}, shard_tokens=3)


def edit_manifest(directory, edit):
    manifest = json.loads((directory / MANIFEST).read_text())
    edit(manifest)
    (directory / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("edit,words", [
    (lambda m: m.clear() or m.update(format_version=1, meta={}), "'shards' is missing"),
    (lambda m: m["shards"][0].pop("sha256"), r"shards\[0\] lacks \['sha256'\]"),
    (lambda m: m.update(meta="tiny"), "'meta'"),
    (lambda m: m["sites"].append("resid_post.9"), "'sites' .* and the sites of 'd' .* disagree"),
    (lambda m: m["shards"][2].update(file="/etc/passwd"), "inside the cache folder"),
])
def test_manifest_structure_is_checked_when_the_cache_is_opened(tmp_path, edit, words):
    write_cache(tmp_path, make_batches(), META, shard_tokens=10)
    edit_manifest(tmp_path, edit)
    with pytest.raises(FeaturekitError, match=rf"{re.escape(str(tmp_path / MANIFEST))} is not a valid .*{words}.*harvest again"):
        ActivationCache(tmp_path)
    (tmp_path / MANIFEST).write_text("[]")
    with pytest.raises(FeaturekitError, match="it holds a JSON list, not an object"):
        ActivationCache(tmp_path)


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("edit,words", [
    (lambda m: m["d"].update({"mlp_out.0": 4}), r"d\['mlp_out.0'\] = 4, the shard's tensor is \(10, 3\)"),
    (lambda m: m.update(dtype="bfloat16"), "dtype is 'bfloat16', the shard's 'mlp_out.0' is float32"),
    (lambda m: (m["sites"].append("attn_z.0"), m["d"].update({"attn_z.0": 8})), r"it lists the sites \['attn_z.0'\], which the shard"),
])
def test_a_manifest_that_does_not_describe_its_shards_is_refused(tmp_path, edit, words, verify):
    write_cache(tmp_path, make_batches(), META, shard_tokens=10)
    edit_manifest(tmp_path, edit)
    cache = ActivationCache(tmp_path)
    with pytest.raises(FeaturekitError, match=rf"{re.escape(str(tmp_path / MANIFEST))} does not describe its shard "
                                              rf"shard_00000.safetensors: {words}"):
        next(cache.iter_shards(verify=verify, sites=["mlp_out.0"]))
