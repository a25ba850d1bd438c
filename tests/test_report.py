"""The HTML report: well-formed, script-free, escaped, and tolerant of missing files."""

import json
from html.parser import HTMLParser

import pytest

from featurekit.errors import FeaturekitError
from featurekit.report import write_report

EVIL = "<script>alert(1)</script>"
EVIL_ATTR = '"onmouseover=alert(2) x="'
VOID = {"meta", "br", "hr", "img", "input", "link", "wbr", "col", "area", "base", "source"}
SVG_LEAVES = {"line", "rect", "polyline", "circle", "path"}


class Checker(HTMLParser):
    """Records tags and attributes and asserts every element is closed in order."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.tags, self.attrs, self.text = [], [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs.extend(attrs)
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs.extend(attrs)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"unbalanced </{tag}>, open: {self.stack[-3:]}"
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def parse(path):
    checker = Checker()
    checker.feed(path.read_text(encoding="utf-8"))
    checker.close()
    assert checker.stack == [], f"unclosed elements: {checker.stack}"
    return checker


def make_run(run_dir):
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(
        {"name": f"run {EVIL}", "model": "smollm2-135m", "note": EVIL_ATTR, "train": {"lr": 1e-3, "k": 32}}))
    lines = [json.dumps({"step": s, "tokens": s * 4096, "loss": 2.0 / (1 + s), "fvu": 0.9 / (1 + 0.3 * s),
                         "l0": 32.0, "dead_fraction": max(0.0, 0.5 - s / 40), "lr": 1e-3, "elapsed_s": s * 0.1})
             for s in range(30)]
    lines.insert(5, '{"step": 5, "loss": NaN}')       # non-finite values are skipped
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 31, "lo')  # truncated last line
    (run_dir / "eval.json").write_text(json.dumps({
        "fvu": 0.123456, "explained_variance": 0.876544, "l0": 31.5, "n_tokens": 123456, "loss_recovered": 0.91,
        "per_layer": {"resid_post.3": {"fvu": 0.2}}, EVIL: EVIL, "shape": [1, 2]}))
    features = run_dir / "features"
    features.mkdir()
    (features / "density.json").write_text(json.dumps({"density": [0.0, 0.0, 1e-4, 0.003, 0.02, 0.2, 0.5]}))
    tokens = ["The", " cat", "\n", EVIL, EVIL_ATTR, "  ", "\t", "end\x00"]
    acts = [0.0, 0.5, 0.0, 3.0, 1.0, 0.0, 0.2, 0.0]
    (features / "top_examples.json").write_text(json.dumps([
        {"index": 5, "density": 0.2, "max_act": 3.0,
         "examples": [{"tokens": tokens, "acts": acts, "max_pos": 3, "value": 3.0}]},
        {"index": 6, "density": 0.5, "max_act": 0.0, "examples": []},
    ]))
    return run_dir


def test_full_report(tmp_path):
    run_dir = make_run(tmp_path / "run1")
    path = write_report(run_dir)
    assert path == run_dir / "report.html"
    html = path.read_text(encoding="utf-8")
    assert "<script" not in html.lower()
    checker = parse(path)
    assert "script" not in checker.tags
    assert not [name for name, _ in checker.attrs if name.startswith("on")]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&quot;onmouseover=alert(2) x=&quot;" in html
    text = "".join(checker.text)
    assert f"run {EVIL}" in text                      # title and heading show the run name, as text
    assert "⏎" in text and "\\x00" in text            # newline and control characters made visible
    assert checker.tags.count("svg") == 6             # loss, FVU, L0, dead fraction, lr, density histogram
    assert "polyline" in checker.tags and "rect" in checker.tags
    titles = [v for name, v in checker.attrs if name == "title"]
    assert any(EVIL in t and "act 3" in t for t in titles)
    assert "resid_post.3.fvu" in text and "0.1235" in text and "123,456" in text
    assert "Skipped 1 unreadable line" in text
    assert "2 dead" in text
    assert 'class="t pk"' in html                      # the peak token is marked
    assert not [r for r in run_dir.iterdir() if r.name.startswith(".report")]  # no temp file left


def test_report_with_missing_files(tmp_path):
    run_dir = tmp_path / "bare"
    run_dir.mkdir()
    checker = parse(write_report(run_dir))
    text = "".join(checker.text)
    for name in ("eval.json", "metrics.jsonl", "density.json", "top_examples.json", "config.json"):
        assert f"No {name}" in text
    assert "bare" in text and "svg" not in checker.tags


def test_report_with_corrupt_files(tmp_path):
    run_dir = tmp_path / "broken"
    (run_dir / "features").mkdir(parents=True)
    (run_dir / "eval.json").write_text("{not json")
    (run_dir / "config.json").write_text("[1, 2]")
    (run_dir / "features" / "density.json").write_text(json.dumps({"density": [0.0, 0.0]}))
    (run_dir / "features" / "top_examples.json").write_text(json.dumps({"oops": 1}))
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    checker = parse(write_report(run_dir))
    text = "".join(checker.text)
    assert "Could not read eval.json" in text
    assert "not a list of features" in text
    assert checker.tags.count("svg") == 2  # one-point loss curve against step, all-dead histogram


def test_report_needs_a_run_dir(tmp_path):
    with pytest.raises(FeaturekitError, match="does not exist"):
        write_report(tmp_path / "nope")
