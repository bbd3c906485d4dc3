"""The routing report: PNGs plus one self-contained ``report.html`` for a checkpoint.

    from moe_lab.analytics import write_report
    html_path = write_report("outputs/demo/model", "outputs/demo")     # -> outputs/demo/report.html

    moe-lab analyze outputs/demo/model --out outputs/demo/analysis    # the same from the CLI

What it writes into ``out_dir``:
- ``expert_specialization.png``: per MoE layer, an experts x labels matrix (share of each
  expert's tokens that came from each domain), with the all-tokens base rate on top;
- ``expert_utilization.png``, ``routing_heatmap.png``: load per expert and layer;
- ``training_curves.png`` when a ``metrics.jsonl`` is found (``metrics_path``, else next to
  the checkpoint: ``CKPT/metrics.jsonl``, ``CKPT/../metrics.jsonl``,
  ``CKPT/../../metrics.jsonl``); without one the report says so;
- ``router_bias.png`` when that file's train records carry ``router_bias`` (aux-loss-free
  balancing, ``model.router_bias_update_rate``): each expert's bias against step, per MoE
  layer; the report has this section only then;
- ``report.json``: every number of the report (``router_bias``: the bias history, when plotted);
- ``report.html``: all of the above with the images embedded as base64 ``data:`` URIs, no
  external resources, readable offline. A small inline script sets
  ``<body data-images-loaded="N" data-images-total="M">`` once the page has loaded (used by
  the headless-browser test).

Data: by default the eval split of the built-in corpus (``build_corpus()`` +
``train_eval_split(eval_fraction=0.05, seed=0)``, as the default job), labelled by
``domain``. ``data`` may be a file or directory of text/jsonl/parquet/csv (loaded with
:func:`moe_lab.data.load_text_dataset`) or any dataset :class:`RouterAnalyzer` accepts; it
must have the label column.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from ..errors import InputError
from .plots import (
    OVERLOAD_FACTOR,
    load_metrics_history,
    load_router_bias_history,
    plot_expert_utilization,
    plot_router_bias,
    plot_routing_heatmap,
    plot_specialization,
    plot_training_curves,
)
from .router_analyzer import RouterAnalyzer, RoutingAnalysis, SpecializationAnalysis

PathLike = Union[str, "os.PathLike[str]"]

REPORT_NAME = "report.html"
#: sequences the report routes by default
DEFAULT_REPORT_SAMPLES = 512
IMAGE_NAMES = {
    "specialization": "expert_specialization.png",
    "utilization": "expert_utilization.png",
    "heatmap": "routing_heatmap.png",
    "training": "training_curves.png",
    "router_bias": "router_bias.png",
}


# ---------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------


def find_metrics(checkpoint_dir: PathLike) -> Optional[Path]:
    """The ``metrics.jsonl`` of the run a checkpoint belongs to, or None."""
    ckpt = Path(checkpoint_dir).resolve()
    for cand in (ckpt / "metrics.jsonl", ckpt.parent / "metrics.jsonl", ckpt.parent.parent / "metrics.jsonl"):
        if cand.is_file():
            return cand
    return None


def default_eval_data() -> Any:
    """The built-in corpus's eval split (text + domain), as the default job uses."""
    from ..data import build_corpus, train_eval_split

    _, eval_ds = train_eval_split(build_corpus(), eval_fraction=0.05, seed=0)
    return eval_ds


def load_report_data(data: Any, text_column: str = "text") -> Any:
    """``data`` as a dataset: None -> built-in eval split; a path -> loaded files; else as is."""
    if data is None:
        return default_eval_data()
    if isinstance(data, (str, os.PathLike)):
        from ..data import load_text_dataset

        if not Path(data).exists():
            raise FileNotFoundError(f"data not found: {data}")
        return load_text_dataset(str(data), text_column=text_column)
    return data


def _columns(ds: Any) -> Optional[List[str]]:
    if hasattr(ds, "column_names"):
        return list(ds.column_names)
    if isinstance(ds, dict):
        return list(ds)
    return None


def _check_dataset(ds: Any, label_column: str) -> None:
    if isinstance(ds, dict) and ds and all(hasattr(v, "column_names") for v in ds.values()):
        raise InputError(f"expected one split of a dataset, got splits {list(ds)}; pass one, e.g. data['validation']")
    cols = _columns(ds)
    try:
        n = len(ds) if cols is None or not isinstance(ds, dict) else len(next(iter(ds.values()), []))
    except TypeError:
        n = None
    if n == 0:
        raise InputError("the dataset is empty (0 rows); the report needs data to route")
    if cols is not None and label_column not in cols:
        raise InputError(
            f"the dataset has no label column {label_column!r}; its columns are {cols}. "
            "Pass --label-column (label_column=) naming one of them"
        )


def _load_model(checkpoint_dir: PathLike, device: Optional[str]) -> Tuple[Any, Any]:
    """The checkpoint's model (in eval mode, on ``device``; default CUDA if available) and tokenizer."""
    from ..checkpoint import Checkpoint

    if not Path(checkpoint_dir).exists():
        raise FileNotFoundError(f"checkpoint directory not found: {checkpoint_dir}")
    ckpt = Checkpoint.open(checkpoint_dir, dropout=0.0)
    return ckpt.build_model(device=device or "auto").eval(), ckpt.tokenizer()


# ---------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------


def specialization_highlights(spec: SpecializationAnalysis, per_label: int = 3, min_tokens: int = 20) -> List[Dict[str, Any]]:
    """For each label, the (layer, expert) pairs whose tokens over-represent it most.

    ``lift`` = the label's share of the expert's tokens / the label's share of all tokens;
    experts with fewer than ``min_tokens`` assignments are skipped.
    """
    base = spec.label_shares()
    rows = []
    for j, label in enumerate(spec.labels):
        if base.get(label, 0.0) <= 0:
            continue
        cands = []
        for i, layer in enumerate(spec.moe_layer_indices):
            for e in range(spec.num_experts):
                total = int(spec.label_counts[i, e].sum())
                if total < min_tokens:
                    continue
                share = int(spec.label_counts[i, e, j]) / total
                cands.append((share / base[label], layer, e, share, total))
        cands.sort(reverse=True)
        for lift, layer, e, share, total in cands[:per_label]:
            rows.append({"label": label, "layer": layer, "expert": e, "share": share,
                         "base_share": base[label], "lift": lift, "expert_tokens": total})
    return rows


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0 auto;max-width:1200px;padding:24px;
color:#1d1d1f;background:#fff;line-height:1.45}
h1{margin-bottom:4px}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:36px}
.meta{color:#555;font-size:14px}table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:right}th{background:#f4f4f6}
td.l,th.l{text-align:left}img{max-width:100%;height:auto;border:1px solid #eee;margin:8px 0}
.note{background:#fff8e1;border:1px solid #f0d98c;padding:8px 12px;border-radius:4px}
.ok{color:#1a7f37}.bad{color:#c62828;font-weight:600}.warn{color:#b26a00;font-weight:600}
nav a{margin-right:14px}code{background:#f4f4f6;padding:1px 4px;border-radius:3px}
details summary{cursor:pointer;margin:6px 0}
"""

_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++; }
  document.body.setAttribute('data-images-loaded', String(ok));
  document.body.setAttribute('data-images-total', String(imgs.length));
});
"""


def _layer_table(routing: RoutingAnalysis) -> str:
    max_ent = routing.max_router_entropy
    head = ("<tr><th class=l>MoE layer</th><th>tokens</th><th>load max/mean</th><th>load CV</th>"
            f"<th>router entropy (max {max_ent:.2f})</th><th>mean top-1 prob</th><th>dropped</th>"
            "<th class=l>dead experts</th><th class=l>overloaded experts</th></tr>")
    rows = []
    for lay in routing.layers:
        dead = ", ".join(map(str, lay.dead_experts)) or "none"
        over = ", ".join(map(str, lay.overloaded_experts)) or "none"
        rows.append(
            f"<tr><td class=l>layer {lay.layer}</td><td>{lay.num_tokens:,}</td><td>{lay.load_imbalance:.2f}</td>"
            f"<td>{lay.load_cv:.2f}</td><td>{lay.router_entropy:.3f}</td><td>{lay.mean_top1_prob:.3f}</td>"
            f"<td>{_pct(lay.dropped_fraction)}</td>"
            f"<td class=l><span class={'bad' if lay.dead_experts else 'ok'}>{dead}</span></td>"
            f"<td class=l><span class={'warn' if lay.overloaded_experts else 'ok'}>{over}</span></td></tr>"
        )
    return "<table>" + head + "".join(rows) + "</table>"


def _health_table(routing: RoutingAnalysis, overload_factor: float) -> str:
    e = routing.num_experts
    rows = []
    for lay in routing.layers:
        for ex in range(e):
            share = lay.expert_fractions[ex]
            if ex in lay.dead_experts:
                status = "<span class=bad>dead (no tokens)</span>"
            elif ex in lay.overloaded_experts:
                status = f"<span class=warn>overloaded ({share * e:.1f}x the uniform share)</span>"
            else:
                continue
            rows.append(f"<tr><td class=l>layer {lay.layer}</td><td>{ex}</td><td>{lay.expert_counts[ex]:,}</td>"
                        f"<td>{_pct(share)}</td><td class=l>{status}</td></tr>")
    if not rows:
        return (f"<p class=ok>No dead or overloaded experts: every expert of every layer got tokens, and none got "
                f"more than {overload_factor:g}x the uniform share (1/{e} = {_pct(1 / e)}).</p>")
    return (f"<p>Dead: no tokens routed. Overloaded: share above {overload_factor:g}x the uniform share "
            f"(1/{e} = {_pct(1 / e)}).</p><table><tr><th class=l>MoE layer</th><th>expert</th><th>tokens</th>"
            "<th>share</th><th class=l>status</th></tr>" + "".join(rows) + "</table>")


def _highlights_table(rows: List[Dict[str, Any]]) -> str:
    if not rows:
        return "<p>No expert received enough tokens to compare.</p>"
    out = ["<table><tr><th class=l>label</th><th class=l>expert</th><th>share of the expert's tokens</th>"
           "<th>share of all tokens</th><th>lift</th></tr>"]
    for r in rows:
        out.append(f"<tr><td class=l>{html.escape(str(r['label']))}</td><td class=l>layer {r['layer']}, expert "
                   f"{r['expert']}</td><td>{_pct(r['share'])}</td><td>{_pct(r['base_share'])}</td>"
                   f"<td>{r['lift']:.2f}x</td></tr>")
    return "".join(out) + "</table>"


def _top_tokens_table(spec: SpecializationAnalysis, k: int = 8) -> str:
    top = spec.top_tokens(k)
    by_layer = spec.by_layer()
    out = ["<table><tr><th class=l>MoE layer</th><th>expert</th><th class=l>main label</th>"
           f"<th class=l>top {k} tokens (count)</th></tr>"]
    for layer, experts in top.items():
        for e, toks in experts.items():
            shares = by_layer[layer].get(e) or {}
            main = max(shares.items(), key=lambda kv: kv[1]) if shares else None
            main_s = f"{html.escape(str(main[0]))} ({_pct(main[1])})" if main else "no tokens"
            tok_s = " ".join(f"<code>{html.escape(t)}</code>&nbsp;{c}" for t, c in toks) or "-"
            out.append(f"<tr><td class=l>layer {layer}</td><td>{e}</td><td class=l>{main_s}</td>"
                       f"<td class=l>{tok_s}</td></tr>")
    return "".join(out) + "</table>"


def render_report_html(
    title: str,
    meta: Dict[str, Any],
    routing: RoutingAnalysis,
    spec: SpecializationAnalysis,
    images: Dict[str, Path],
    training_note: Optional[str],
    overload_factor: float = OVERLOAD_FACTOR,
) -> str:
    """The report page as one HTML string (images embedded from ``images``)."""
    meta_rows = "".join(f"<tr><th class=l>{html.escape(k)}</th><td class=l>{html.escape(str(v))}</td></tr>"
                        for k, v in meta.items())
    base = spec.label_shares()
    base_s = ", ".join(f"{html.escape(str(k))} {_pct(v)}" for k, v in base.items())
    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>",
        '<body data-images-loaded="pending">',
        f"<h1>{html.escape(title)}</h1>",
        f"<p class=meta>Generated {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')} by moe_lab. "
        "Self-contained: images are embedded; no network needed.</p>",
        '<nav><a href="#specialization">Specialisation</a><a href="#utilization">Utilisation</a>'
        '<a href="#heatmap">Heatmap</a><a href="#health">Dead / overloaded</a><a href="#tokens">Top tokens</a>'
        '<a href="#training">Training curves</a>'
        + ('<a href="#router-bias">Router bias</a>' if "router_bias" in images else "") + "</nav>",
        f"<table>{meta_rows}</table>",
        "<h2>Routing health per layer</h2>",
        _layer_table(routing),
        '<h2 id="specialization">Which experts handle which domains</h2>',
        f"<p>Each panel is one MoE layer. Row <em>expert e</em> shows where that expert's routed tokens came from "
        f"(each row sums to 100%). The top row <em>all tokens</em> is the base rate ({base_s}): an expert whose row "
        "differs from it specialises in the labels it over-represents.</p>",
        _img(images["specialization"], "expert specialisation by label"),
        "<h3>Most specialised experts per label</h3>",
        _highlights_table(specialization_highlights(spec)),
        '<h2 id="utilization">Expert utilisation per layer</h2>',
        "<p>Share of each layer's routed tokens per expert; the dashed line is the uniform share, red bars are "
        "overloaded experts.</p>",
        _img(images["utilization"], "expert utilisation per layer"),
        '<h2 id="heatmap">Routing heatmap</h2>',
        _img(images["heatmap"], "routing heatmap"),
        '<h2 id="health">Dead and overloaded experts</h2>',
        _health_table(routing, overload_factor),
        '<h2 id="tokens">Top tokens per expert</h2>',
        "<details><summary>Show the tokens each expert receives most often</summary>",
        _top_tokens_table(spec),
        "</details>",
        '<h2 id="training">Training curves</h2>',
    ]
    if "training" in images:
        parts.append(_img(images["training"], "training curves"))
    else:
        parts.append(f"<p class=note>{html.escape(training_note or 'No training metrics.')}</p>")
    if "router_bias" in images:
        parts += [
            '<h2 id="router-bias">Router bias (aux-loss-free balancing)</h2>',
            "<p>Each expert's bias, added to its routing score for expert selection only (never to the combine "
            "weights), against the optimizer step. After each step it rises for experts that got less than the "
            "mean load and falls for those that got more; flat lines mean the load has settled.</p>",
            _img(images["router_bias"], "router bias per expert over training"),
        ]
    parts += [f"<script>{_SCRIPT}</script>", "</body></html>"]
    return "\n".join(parts)


def write_report(
    checkpoint_dir: PathLike,
    out_dir: PathLike,
    data: Any = None,
    num_samples: Optional[int] = DEFAULT_REPORT_SAMPLES,
    metrics_path: Optional[PathLike] = None,
    label_column: str = "domain",
    text_column: str = "text",
    max_length: Optional[int] = None,
    batch_size: int = 16,
    device: Optional[str] = None,
) -> Path:
    """Analyse a checkpoint and write the PNGs, ``report.json`` and ``report.html`` into ``out_dir``.

    Args:
        checkpoint_dir: a moe_lab checkpoint directory (its tokenizer is used when saved).
        out_dir: created if needed.
        data: None (built-in corpus eval split), a data file/directory, or a dataset with
            ``input_ids`` or ``text_column`` plus ``label_column``.
        num_samples: at most this many sequences of up to ``max_length`` tokens, evenly spaced
            over the data (the default, 512 x 128 tokens, takes ~10 s on a laptop CPU for the demo model).
        metrics_path: the run's ``metrics.jsonl`` (default: searched next to the checkpoint).
        label_column: the label of each row (``domain`` on the built-in corpus).
        max_length: tokens per sequence (default 128, capped at the model's context).

    Returns:
        The path of ``report.html``.

    Raises:
        InputError: the dataset is empty or lacks ``label_column`` (the message lists its columns).
        CheckpointError / FileNotFoundError: the checkpoint or the data cannot be read.
    """
    if isinstance(num_samples, bool) or (num_samples is not None and (not isinstance(num_samples, int) or num_samples < 1)):
        raise InputError(f"num_samples must be a positive int, got {num_samples!r}")
    model, tokenizer = _load_model(checkpoint_dir, device)
    dataset = load_report_data(data, text_column)
    _check_dataset(dataset, label_column)
    analyzer = RouterAnalyzer(model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    routing, spec = analyzer.analyze(dataset, num_samples=num_samples, label_column=label_column,
                                     text_column=text_column)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images: Dict[str, Path] = {}
    images["specialization"] = Path(plot_specialization(spec, out / IMAGE_NAMES["specialization"]))
    images["utilization"] = Path(plot_expert_utilization(routing, out / IMAGE_NAMES["utilization"]))
    images["heatmap"] = Path(plot_routing_heatmap(routing.heatmap, out / IMAGE_NAMES["heatmap"],
                                                  layer_labels=routing.moe_layer_indices))
    metrics = Path(metrics_path) if metrics_path is not None else find_metrics(checkpoint_dir)
    training_note = None
    bias_history: Dict[int, Dict[str, List[Any]]] = {}
    if metrics is not None and metrics.is_file():
        history = load_metrics_history(metrics)
        if history.get("loss") or history.get("eval_loss"):
            images["training"] = Path(plot_training_curves(history, str(out / IMAGE_NAMES["training"])))
        else:
            training_note = f"{metrics} has no loss records, so there are no training curves."
        bias_history = load_router_bias_history(metrics)
        if bias_history:
            images["router_bias"] = Path(plot_router_bias(bias_history, out / IMAGE_NAMES["router_bias"]))
    else:
        where = str(metrics) if metrics is not None else "next to the checkpoint (metrics.jsonl)"
        training_note = f"No training metrics found {'at ' if metrics is not None else ''}{where}; " \
                        "this report has no training curves."

    cfg = model.config
    meta = {
        "checkpoint": str(Path(checkpoint_dir).resolve()),
        "model": (f"{cfg.num_layers} layers (MoE layers {routing.moe_layer_indices}), hidden {cfg.hidden_size}, "
                  f"{cfg.num_experts} experts, top-{cfg.experts_per_token}, router {cfg.router_type.value if hasattr(cfg.router_type, 'value') else cfg.router_type}"),
        "parameters": f"{model.num_parameters():,} total, {model.num_parameters(active_only=True):,} active per token",
        "data": (f"{'built-in corpus eval split' if data is None else (str(data) if isinstance(data, (str, os.PathLike)) else type(data).__name__)}: "
                 f"{routing.num_sequences:,} sequences, {routing.num_tokens:,} tokens, labels from {label_column!r}"),
        "training metrics": str(metrics) if "training" in images else "none",
    }
    report_json = {"meta": meta, "routing": routing.to_dict(), "specialization": spec.to_dict(),
                   "highlights": [{**r, "label": str(r["label"])} for r in specialization_highlights(spec)]}
    if "router_bias" in images:
        report_json["router_bias"] = {str(layer): h for layer, h in bias_history.items()}
    (out / "report.json").write_text(json.dumps(report_json, indent=1))
    page = render_report_html("MoE routing report", meta, routing, spec, images, training_note)
    path = out / REPORT_NAME
    path.write_text(page, encoding="utf-8")
    return path
