"""The text-source and token-class probing tasks: labels from token strings, chunking and the by-document split
on hand-made corpora, and `featurekit eval --suite probing_source,probing_tokens` on the tiny random model."""

from __future__ import annotations

import json

from featurekit.data.probe_labels import chunks, held_out_documents, source_chunks, token_labels
from featurekit.data.sources import is_test_document
from featurekit.dictionaries import TopKSAE
from featurekit.interop import export
from featurekit.pipeline.probing_tasks import select_tokens

from .conftest import cli


def positive(token: str) -> set[str]:
    return {task for task, yes in token_labels(token).items() if yes}


def test_token_labels_come_from_the_token_string():
    assert positive("2004") == {"digit"} and positive(" 7") == {"digit"} and positive("12a") == set()
    assert positive(" London") == {"capitalised_word"} and positive("London") == set()  # not a word start
    assert positive(" BBC") == set() and positive(" McDonald") == set()  # only one capital, then lower case
    assert positive(" cats") == {"plural_looking"} and positive(" class") == set() and positive(" is") == set()
    assert positive("cats") == set() and positive(" Cats") == {"capitalised_word"}
    assert positive(" January") == {"capitalised_word", "month"} and positive(" May") == {"capitalised_word"}
    assert positive(" january") == set() and positive("January") == set()


def test_chunks_are_equal_length_and_drop_the_tail():
    assert chunks("abcdefghij", 3) == ["abc", "def", "ghi"]
    assert chunks("ab", 3) == []


def corpora() -> dict[str, list[str]]:
    return {"a": [f"alpha document {i} " * (3 + i % 4) for i in range(30)],
            "b": [f"beta work {i} " * 40 for i in range(6)]}


def test_source_chunks_never_put_a_held_out_document_in_training():
    data = corpora()
    train, test = source_chunks(data, 20, 50, "train"), source_chunks(data, 20, 50, "test")
    for name, docs in data.items():
        held = held_out_documents(docs, 0.2)
        assert len(held) == max(1, -(-len(docs) // 5))
        assert {i for _, n, i in train if n == name}.isdisjoint(held)
        assert {i for _, n, i in test if n == name} <= held
        assert {i for i, d in enumerate(docs) if is_test_document(d)} <= held
    assert all(len(c) == 20 and c in data[n][i] for c, n, i in train + test)
    # balanced where there is enough text, round-robin: every training document of "b" gives a chunk before any gives two
    few = source_chunks(data, 20, 5, "train")
    assert sum(n == "a" for _, n, _ in few) == 5 and sum(n == "b" for _, n, _ in few) == 5
    b_train = set(range(6)) - held_out_documents(data["b"], 0.2)
    assert len(b_train) == 4 and {i for _, n, i in few if n == "b"} == b_train


def test_select_tokens_balances_and_caps():
    labels = [i % 5 == 0 for i in range(100)]  # 20 positives, 80 negatives
    idx, y = select_tokens(labels, cap=8, seed=0)
    assert int(y.sum()) == 8 and len(idx) == 16 and all(labels[i] == t for i, t in zip(idx.tolist(), y.tolist()))
    idx, y = select_tokens(labels, cap=1000, seed=0)
    assert int(y.sum()) == 20 and len(idx) == 40


def test_eval_suites_probing_source_and_tokens_on_the_tiny_model(probing_run):
    run = probing_run
    done = cli("eval", str(run), "--suite", "probing_source,probing_tokens", "--quiet")
    assert done.returncode == 0, done.stderr
    source = json.loads((run / "evals" / "sparse_probing_source.json").read_text())
    assert source["eval_type_id"] == "sparse_probing" and source["eval_config"]["task"] == "text_source"
    assert {"bbc", "bible", "shakespeare"} <= set(source["eval_result_unstructured"]["per_class"])
    assert set(source["eval_result_metrics"]["sae"]) == {"sae_test_accuracy", "sae_top_1_test_accuracy", "sae_top_2_test_accuracy"}
    assert source["eval_result_details"][0]["dataset_name"] == "text_source_results"
    tokens = json.loads((run / "evals" / "sparse_probing_tokens.json").read_text())
    # the tiny word-level vocabulary has no digits, capitals, months or words ending in s: every task is skipped, said so
    assert set(tokens["eval_result_unstructured"]["skipped"]) == {"digit", "capitalised_word", "plural_looking", "month"}
    assert tokens["eval_result_details"] == [] and "skipped digit" in done.stdout


def test_token_codes_read_each_asked_position_of_each_document(tiny):
    """Per-token rows equal the site's activation at that (document, position), across batch boundaries."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from featurekit.evaluate.probing import token_codes, token_documents
    from featurekit.models.hooks import capture_activations

    model = AutoModelForCausalLM.from_pretrained(tiny / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny / "model")
    docs = ["the cat sat on the mat and the dog ran far away", "short", "a big red bird sat under the old tree at night"]
    ids, mask, kept = token_documents(tokenizer, docs, 8)
    assert kept == [0, 2] and ids.shape == (2, 8) and not mask[:, 0].any()
    positions = torch.tensor([[1, 5], [0, 3], [1, 2]])
    sae = TopKSAE(32, 16, k=2, seed=0)
    dense, codes = token_codes(model, sae, "resid_post.1", ids, positions, batch_size=1)
    with torch.no_grad():
        acts = capture_activations(model, ids, ["resid_post.1"])["resid_post.1"]
        want = acts[positions[:, 0], positions[:, 1]]
        assert torch.allclose(dense, want, atol=1e-5) and torch.allclose(codes, sae.encode(want), atol=1e-5)


def test_probing_tokens_probes_a_task_with_positives_and_skips_the_others(tmp_path):
    """A tiny random Llama whose word vocabulary holds numbers: on BBC text the digit task has positives and is
    probed (held-out accuracy in [0, 1], balanced counts); the other three have none and are skipped."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from featurekit.pipeline.importing import import_run
    from featurekit.pipeline.probing_tasks import run_probing_tokens
    from featurekit.pipeline.setup import load_run_config

    from ..tiny import WORDS

    words = WORDS + [str(n) for n in range(100)] + [str(n) for n in range(1990, 2010)]
    vocab = {w: i for i, w in enumerate(["[UNK]", "<pad>", "<bos>", "<eos>"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         bos_token_id=2, eos_token_id=3, pad_token_id=1))
    model.save_pretrained(tmp_path / "model")
    hf_tok.save_pretrained(tmp_path / "model")
    sae = TopKSAE(32, 64, k=4, seed=0)
    sae.metadata = {"source": {"model": str(tmp_path / "model"), "site": "resid_post.1"}}
    folder = export(sae, "saelens", tmp_path / "saelens_sae")
    import_run(str(folder), [f"out_dir={tmp_path / 'runs'}", "model.dtype=float32", "name=r", "eval.probing_train_docs=12",
                             "eval.probing_test_docs=8", "eval.probing_tokens=32", "eval.probing_ks=1,2"])
    result = run_probing_tokens(load_run_config(tmp_path / "runs" / "r"))
    unstructured = result["eval_result_unstructured"]
    assert set(unstructured["skipped"]) == {"capitalised_word", "plural_looking", "month"}
    digit = unstructured["per_task"]["digit"]
    assert digit["n_train"] == 2 * digit["n_positive_train"] >= 8 and digit["n_test"] == 2 * digit["n_positive_test"] >= 8
    assert [d["dataset_name"] for d in result["eval_result_details"]] == ["token_digit_results"]
    assert all(0.0 <= v <= 1.0 for group in result["eval_result_metrics"].values() for v in group.values())
    assert (tmp_path / "runs" / "r" / "evals" / "sparse_probing_tokens.json").is_file()
