"""Attribution graphs in the explorer: the graph files named by `featurekit serve --graphs G.json ...` (written by
`featurekit trace`; circuit-tracer / Neuronpedia schema), laid out layer × position for the viewer page, their
feature nodes linked to the served runs whose dictionary is that layer's transcoder, and interventions on them.

The page draws at most `MAX_DRAWN_EDGES` edges, the strongest by |weight|, and says how many it left out (every
node is drawn; the pruning slider works within the drawn edges).

A graph is addressed in URLs by its file's stem (made unique with `-2`, `-3`, …) or its index, never by a path.

Links: a feature node of layer L links to the feature page of the served run whose dictionary folder (`dictionary/`,
or the set layer a set's store run names, or the run folder itself) is the graph's `transcoder_list[L]` (per-layer
sets; a CLT's nodes get no link). `store_runs` finds the store runs `featurekit circuits features` wrote for the
graph's layers at their default place (SET/stores/layer_L), which `serve --graphs` then serves too. Relative
paths in the graph are read from the server's working folder first, then from the graph file's folder.

Interventions (`Intervener`): the graph's model (`metadata.featurekit.model`, else `metadata.scan`) and transcoder
set (`transcoder_list`) are loaded on the first request and kept; the prompt's local replacement model is built
once (`circuits.replacement.build`), and each request reruns it with up to `MAX_CLAMPS` codes held at chosen
values (attention patterns, norm scales and error terms frozen at the clean forward), returning the new top
logits of the last position beside the unclamped ones.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import FeaturekitError
from ..features.store import FILENAME, FeatureStore
from .queries import BadRequest, NotFound
from .runs import Run, Runs

MAX_GRAPH_BYTES = 64 * 1024 * 1024
MAX_CLAMPS = 4
MAX_DRAWN_EDGES = 20_000  #: the strongest edges the page draws; a 14-token 30-layer graph keeps ~600k (minutes to open)
MAX_VALUE = 1e4
TOP_LOGITS = 10
KINDS = {"embedding": "emb", "logit": "logit", "mlp reconstruction error": "err"}
ROW_H, CELL_MIN_W, NODE_GAP, LEFT, TOP, BOTTOM = 46, 64, 13, 56, 84, 64


def node_kind(node: dict) -> str:
    """feat, err, emb or logit (circuit-tracer's feature_type values; anything else with a layer is a feature)."""
    return KINDS.get(str(node.get("feature_type", "")), "feat")


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


class ServedGraph:
    """One graph file, read once (it never changes under a running server)."""

    def __init__(self, index: int, name: str, path: Path) -> None:
        self.index, self.name, self.path = index, name, path
        try:
            size = path.stat().st_size
        except OSError as err:
            raise FeaturekitError(f"cannot read the graph file {path} ({err.strerror or err}): pass a JSON file that "
                                  "`featurekit trace --out` wrote") from None
        if size > MAX_GRAPH_BYTES:
            raise FeaturekitError(f"the graph file {path} is {size / 2**20:.0f} MiB; the viewer reads graphs up to "
                                  f"{MAX_GRAPH_BYTES // 2**20} MiB: trace with a higher pruning (--node-threshold below 0.8)")
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            raise FeaturekitError(f"{path} is not a JSON file ({err}); pass a graph that `featurekit trace --out` wrote") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("nodes"), list) or not isinstance(doc.get("links"), list):
            raise FeaturekitError(f"{path} is not an attribution graph: it needs `nodes` and `links` lists (circuit-tracer's "
                                  "graph JSON, as `featurekit trace` writes it)")
        self.meta: dict = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
        self.nodes: list[dict] = [n for n in doc["nodes"] if isinstance(n, dict) and isinstance(n.get("node_id"), str)]
        ids = {n["node_id"] for n in self.nodes}
        self.links: list[dict] = [e for e in doc["links"] if isinstance(e, dict) and e.get("source") in ids
                                  and e.get("target") in ids and _num(e.get("weight")) is not None]
        self.by_id = {n["node_id"]: n for n in self.nodes}
        extra = self.meta.get("featurekit") if isinstance(self.meta.get("featurekit"), dict) else {}
        self.extra: dict = extra
        self.model_name = str(extra.get("model") or self.meta.get("scan") or "")
        listing = self.meta.get("transcoder_list")
        self.transcoder_list: list[str] = [str(x) for x in listing] if isinstance(listing, list) else []
        self.prompt = str(self.meta.get("prompt", ""))
        tokens = self.meta.get("prompt_tokens")
        self.tokens: list[str] = [str(t) for t in tokens] if isinstance(tokens, list) else []
        self.intervener = Intervener(self)

    @property
    def title(self) -> str:
        return str(self.meta.get("slug") or self.name)

    @property
    def model_label(self) -> str:
        """The model's name as the page shows it: a local model folder by its own name, not the machine's path
        (an embedded name or Hub id as it is)."""
        name = self.model_name
        path = Path(name)
        return path.name if name and (path.is_absolute() or name.startswith(".")) and path.name else name

    @property
    def partial(self) -> dict | None:
        """{"covered", "missing"} when the graph was traced through a partial set, else None."""
        value = self.extra.get("partial_set")
        return value if isinstance(value, dict) else None

    def resolve(self, entry: str) -> Path:
        """A path the graph names: absolute, or relative to the working folder, else to the graph's folder."""
        p = Path(entry)
        if p.is_absolute() or p.exists():
            return p
        return self.path.parent / p

    # -- the feature nodes and their runs --------------------------------------------------------------------
    @staticmethod
    def feature_of(node: dict) -> tuple[int, int] | None:
        """(layer, latent) of a feature node, from its id "{layer}_{latent}_{pos}"; None for another node."""
        if node_kind(node) != "feat":
            return None
        parts = node["node_id"].split("_")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            return None
        return int(parts[0]), int(parts[1])

    def layer_runs(self, runs: Runs) -> dict[int, Run]:
        """layer → the served run whose dictionary is that layer's transcoder (module docstring)."""
        if len(self.transcoder_list) < 1 or self.meta.get("info", {}).get("description", "").find("cross-layer") >= 0:
            return {}
        folders: dict[Path, Run] = {}
        for run in runs:
            for p in (getattr(run, "dictionary_dir", run.path / "dictionary"), run.path):
                try:
                    folders.setdefault(p.resolve(), run)
                except OSError:
                    continue
        out = {}
        for layer, entry in enumerate(self.transcoder_list):
            try:
                run = folders.get(self.resolve(entry).resolve())
            except OSError:
                run = None
            if run is not None:
                out[layer] = run
        return out

    def store_runs(self) -> list[Path]:
        """The feature store runs of the graph's transcoders at their default place (SET/stores/layer_L beside a set's
        layer_L folder, `featurekit circuits features`) that exist."""
        from ..circuits.transcoder_set import NO_TRANSCODER, store_folder

        out = []
        for entry in self.transcoder_list:
            if entry == NO_TRANSCODER or entry.startswith("layer ") or entry == "cross-layer transcoder":
                continue
            run = store_folder(self.resolve(entry))
            if (run / "config.json").is_file() and (run / FILENAME).is_file():
                out.append(run)
        return out

    # -- the page -------------------------------------------------------------------------------------------
    def layout(self, runs: Runs, max_edges: int = MAX_DRAWN_EDGES) -> dict[str, Any]:
        """What the viewer page draws: nodes with (x, y) and details, edges with width and sign, rows, columns."""
        n_pos = max([len(self.tokens)] + [int(n["ctx_idx"]) + 1 for n in self.nodes if isinstance(n.get("ctx_idx"), int)])
        layers = sorted({int(n["layer"]) for n in self.nodes if node_kind(n) in ("feat", "err") and str(n.get("layer", "")).isdigit()})
        n_layers = (layers[-1] + 1) if layers else 0
        row_of = {}
        for n in self.nodes:
            kind, layer = node_kind(n), str(n.get("layer", ""))
            row_of[n["node_id"]] = 0 if kind == "emb" else n_layers + 1 if kind == "logit" else int(layer) + 1 if layer.isdigit() else 0
        n_rows = n_layers + 2
        cells: dict[tuple[int, int], list[dict]] = {}
        for n in self.nodes:
            pos = n.get("ctx_idx") if isinstance(n.get("ctx_idx"), int) else 0
            cells.setdefault((row_of[n["node_id"]], pos), []).append(n)
        widths = [CELL_MIN_W] * max(n_pos, 1)
        for (_, pos), members in cells.items():
            if 0 <= pos < len(widths):
                widths[pos] = max(widths[pos], NODE_GAP * len(members) + 16)
        starts = [LEFT]
        for w in widths:
            starts.append(starts[-1] + w)
        height = TOP + n_rows * ROW_H + BOTTOM

        def y_of(row: int) -> float:
            return TOP + (n_rows - 1 - row) * ROW_H + ROW_H / 2

        place: dict[str, tuple[float, float]] = {}
        for (row, pos), members in cells.items():
            members.sort(key=lambda n: (node_kind(n) != "err", -(abs(_num(n.get("activation")) or 0.0))))
            pos = min(max(pos, 0), len(widths) - 1)
            center = starts[pos] + widths[pos] / 2
            for i, n in enumerate(members):
                place[n["node_id"]] = (round(center + (i - (len(members) - 1) / 2) * NODE_GAP, 1), round(y_of(row), 1))

        links = self.layer_runs(runs)
        wanted: dict[int, set[int]] = {}
        for n in self.nodes:
            f = self.feature_of(n)
            if f and f[0] in links and f[1] < links[f[0]].n_latents:
                wanted.setdefault(f[0], set()).add(f[1])
        summaries = {layer: links[layer].query(FeatureStore.summaries, ids) for layer, ids in wanted.items()}
        nodes = []
        for n in self.nodes:
            kind, pos = node_kind(n), n.get("ctx_idx") if isinstance(n.get("ctx_idx"), int) else 0
            f = self.feature_of(n)
            x, y = place[n["node_id"]]
            record = {"id": n["node_id"], "kind": kind, "x": x, "y": y, "layer": str(n.get("layer", "")), "pos": pos,
                      "token": self.tokens[pos] if 0 <= pos < len(self.tokens) else "", "act": _num(n.get("activation")),
                      "influence": _num(n.get("influence")), "label": str(n.get("clerp") or ""), "run": "",
                      "short": str(n.get("clerp") or "").removeprefix("Output "),
                      "explanation": "", "top": [], "latent": f[1] if f else None, "prob": _num(n.get("token_prob"))}
            if f and f[0] in links:
                run, s = links[f[0]], summaries.get(f[0], {}).get(f[1])
                if s is not None:
                    record.update(run=run.name, explanation=s.get("explanation") or "", top=s.get("tokens") or [])
            nodes.append(record)
        peak = max((abs(float(e["weight"])) for e in self.links), default=0.0) or 1.0
        edges = []
        drawn = sorted(self.links, key=lambda e: abs(float(e["weight"])))[-max_edges:] if max_edges > 0 else []
        for e in drawn:
            (x1, y1), (x2, y2), w = place[e["source"]], place[e["target"]], float(e["weight"])
            edges.append({"s": e["source"], "t": e["target"], "w": w, "rel": abs(w) / peak, "x1": x1, "y1": y1, "x2": x2, "y2": y2,
                          "width": round(0.4 + 3.6 * abs(w) / peak, 2), "sign": "pos" if w >= 0 else "neg"})
        rows = [{"label": "emb" if r == 0 else "logit" if r == n_layers + 1 else f"L{r - 1}", "y": y_of(r)} for r in range(n_rows)]
        columns = [{"x": starts[i] + widths[i] / 2, "token": self.tokens[i] if i < len(self.tokens) else "", "pos": i}
                   for i in range(len(widths))]
        features = sum(1 for n in nodes if n["kind"] == "feat")
        linked = sorted({f"L{layer} → {run.name}" for layer, run in links.items()})
        return {"nodes": nodes, "edges": edges, "rows": rows, "columns": columns, "width": starts[-1] + 16, "height": height,
                "peak": peak, "n_features": features, "edges_cut": len(self.links) - len(edges), "linked": linked,
                "row_h": ROW_H, "left": LEFT,
                "logit_y": y_of(n_rows - 1), "bottom_y": height - BOTTOM + 14}


class Graphs:
    """The served graphs, in command-line order."""

    def __init__(self, paths: Sequence[str | Path]) -> None:
        self.graphs: list[ServedGraph] = []
        seen: set[str] = set()
        for i, path in enumerate(paths):
            path = Path(path)
            base = path.stem or f"graph{i}"
            name, n = base, 2
            while name in seen or name.isdigit():
                name, n = f"{base}-{n}", n + 1
            seen.add(name)
            self.graphs.append(ServedGraph(i, name, path))

    def __iter__(self):
        return iter(self.graphs)

    def __len__(self) -> int:
        return len(self.graphs)

    def get(self, key: str) -> ServedGraph:
        for g in self.graphs:
            if g.name == key:
                return g
        if key.isdigit() and int(key) < len(self.graphs):
            return self.graphs[int(key)]
        names = ", ".join(g.name for g in self.graphs) or "none (pass --graphs G.json to featurekit serve)"
        raise NotFound(f"no graph {key!r} is served here: the graphs are {names}")


def parse_clamps(body: Any, graph: ServedGraph) -> dict[str, float]:
    """node id → value from the request's JSON {"clamps": [{"node": ID, "value": V}, ...]}."""
    clamps = body.get("clamps") if isinstance(body, dict) else None
    if not isinstance(clamps, list) or not clamps:
        raise BadRequest('send {"clamps": [{"node": "LAYER_LATENT_POS", "value": NUMBER}]}: pin a feature node and set its activation')
    if len(clamps) > MAX_CLAMPS:
        raise BadRequest(f"{len(clamps)} features given; clamp at most {MAX_CLAMPS} at once")
    out: dict[str, float] = {}
    for c in clamps:
        node = c.get("node") if isinstance(c, dict) else None
        value = c.get("value") if isinstance(c, dict) else None
        if not isinstance(node, str) or graph.by_id.get(node) is None:
            raise BadRequest(f"{str(node)[:80]!r} is not a node of this graph: pin a feature node")
        if graph.feature_of(graph.by_id[node]) is None:
            raise BadRequest(f"{node} is a {graph.by_id[node].get('feature_type', 'non-feature')} node; only feature nodes can be set")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise BadRequest(f"the value {str(value)[:40]!r} for {node} is not a number") from None
        if not abs(number) <= MAX_VALUE:
            raise BadRequest(f"the value {value} for {node} is outside ±{MAX_VALUE:g}")
        out[node] = number
    return out


class Intervener:
    """The graph's prompt in its local replacement model, built on the first intervention and kept."""

    def __init__(self, graph: ServedGraph) -> None:
        self.graph = graph
        self._lock = threading.Lock()
        self._state: tuple[Any, Any, torch.Tensor] | None = None  # (tokenizer, replacement model, baseline logits)

    def _transcoders(self) -> Any:
        from ..circuits import transcoder_set

        entries = self.graph.transcoder_list
        present = [e for e in entries if e != transcoder_set.NO_TRANSCODER]
        if not present or any(e.startswith("layer ") or e == "cross-layer transcoder" for e in present):
            raise FeaturekitError("the graph does not say where its transcoders are (transcoder_list holds no folders); "
                                  "trace it again with `featurekit trace --set SET_DIR`")
        paths = [self.graph.resolve(e) for e in present]
        if len(present) < len(entries):          # traced through a partial set: its gaps stay error nodes
            return transcoder_set.partial(transcoder_set.from_folders(paths), len(entries))
        if len(paths) == 1:
            for folder in (paths[0], paths[0].parent):  # a cross-layer set lists its CLT folder inside the set
                if (folder / transcoder_set.MANIFEST).is_file():
                    return transcoder_set.load(folder)
        return transcoder_set.from_folders(paths)

    def _build(self) -> tuple[Any, Any, torch.Tensor]:
        from ..circuits import replacement
        from ..circuits.trace import prompt_ids
        from ..models.loading import load_model

        if not self.graph.model_name:
            raise FeaturekitError("the graph does not name its model (metadata.scan); trace it again with featurekit trace")
        tset = self._transcoders()
        loaded = load_model(self.graph.model_name)
        ids = prompt_ids(loaded.tokenizer, self.graph.prompt)
        expected = {int(n["ctx_idx"]): n["node_id"].split("_")[1] for n in self.graph.nodes
                    if node_kind(n) == "emb" and isinstance(n.get("ctx_idx"), int)}
        if any(pos >= len(ids) or str(int(ids[pos])) != tok for pos, tok in expected.items()):
            raise FeaturekitError(f"{self.graph.model_name}'s tokenizer splits the prompt differently from the graph's tokens; "
                                  "the graph was traced on another model")
        with torch.no_grad():
            rm = replacement.build(loaded.model, tset, ids)
            baseline = rm.replacement_logits()[-1]
        return loaded.tokenizer, rm, baseline

    def intervene(self, clamps: dict[str, float]) -> dict[str, Any]:
        with self._lock:
            if self._state is None:
                self._state = self._build()
            tokenizer, rm, baseline = self._state
            keys = {}
            for node, value in clamps.items():
                n = self.graph.by_id[node]
                layer, latent = self.graph.feature_of(n)  # type: ignore[misc]
                pos = n.get("ctx_idx")
                if layer >= rm.n_layers or latent >= rm.codes[layer].shape[-1] or not isinstance(pos, int) or not 0 <= pos < rm.n_pos:
                    raise BadRequest(f"{node} is not a feature of the graph's transcoders: layer {layer} has "
                                     f"{rm.codes[min(layer, rm.n_layers - 1)].shape[-1]} latents and the prompt {rm.n_pos} positions")
                keys[(layer, pos, latent)] = value
            with torch.no_grad():
                logits = rm.replacement_logits(clamps=keys)[-1]
        before = _top(tokenizer, baseline, logits, after_minus_before=-1)
        after = _top(tokenizer, logits, baseline)
        originals = {node: _num(self.graph.by_id[node].get("activation")) for node in clamps}
        return {"clamps": [{"node": k, "value": v, "was": originals[k]} for k, v in clamps.items()],
                "baseline": before, "clamped": after}


def _top(tokenizer: Any, logits: torch.Tensor, other: torch.Tensor, after_minus_before: int = 1) -> list[dict[str, Any]]:
    """The top logits of `logits` with their probabilities and `delta_prob`, the token's probability with the clamp
    minus without it (`logits` are the clamped ones when `after_minus_before` is 1, the baseline when -1)."""
    p, q = logits.float().softmax(-1), other.float().softmax(-1)
    values, ids = p.topk(min(TOP_LOGITS, p.numel()))
    return [{"token": tokenizer.decode([int(i)]), "id": int(i), "prob": float(v), "logit": float(logits[i]),
             "delta_prob": after_minus_before * float(v - q[i])} for v, i in zip(values, ids)]
