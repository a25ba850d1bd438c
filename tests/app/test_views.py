"""Pages rendered in process from a copy of a run whose store holds explanations (as `featurekit explain` writes
them, including one with markup in it): the feature page, the list and the search show them, escaped."""

from __future__ import annotations

import shutil
import sqlite3

import pytest

from featurekit.app import queries, views
from featurekit.app.runs import Run
from featurekit.features.store import FILENAME

from .conftest import XSS


@pytest.fixture
def explained(app_runs, tmp_path):
    folder = tmp_path / "explained"
    shutil.copytree(app_runs["topk"], folder, ignore=shutil.ignore_patterns("activations", "checkpoint"))
    db = sqlite3.connect(folder / FILENAME)
    db.executemany("INSERT INTO explanations VALUES (?, ?, ?, ?, NULL)",
                   [(3, "highlight", "cats on mats " + XSS[0], 0.9), (3, "logits", "worse one", 0.2), (5, "highlight", "rivers", None)])
    db.commit()
    db.close()
    run = Run(0, "explained", folder)
    yield run
    run.close()


def render(run, template, **context):
    return views.render(template, runs=[run], run=run, path="/", q="", **context)


def test_explanations_are_shown_and_escaped(explained):
    run = explained
    page = queries.feature_page(run, 3)
    html = render(run, "feature.html", section="features", f=page, others=[], fid=3,
                  hist=views.act_histogram(page["hist"], run.meta["hist_edges"], page["density"]))
    assert "cats on mats &lt;script&gt;alert(1)&lt;/script&gt;" in html and XSS[0] not in html
    assert html.index("cats on mats") < html.index("worse one")  # best score first
    data = queries.feature_list(run, "id", False, 1)
    html = render(run, "features.html", section="features", data=data, sorts=queries.SORT_LABELS)
    assert "<th>explanation</th>" in html and "rivers" in html and XSS[0] not in html
    data = queries.search(run, "mats", "explanation")
    assert [r["id"] for r in data["explanations"]] == [3]
    html = render(run, "search.html", section="features", data=data, kinds=queries.SEARCH_KINDS)
    assert 'href="/r/explained/f/3"' in html and XSS[0] not in html


def test_a_store_without_explanations_hides_the_column(app_runs):
    run = Run(0, "topk", app_runs["topk"])
    try:
        html = render(run, "features.html", section="features", data=queries.feature_list(run), sorts=queries.SORT_LABELS)
        assert "<th>explanation</th>" not in html
    finally:
        run.close()
